//! vbdev-ro (to be written).
