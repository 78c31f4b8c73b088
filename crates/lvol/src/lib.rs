//! lvol (to be written).
