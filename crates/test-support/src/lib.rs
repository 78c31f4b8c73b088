//! test-support (to be written).
