//! Raw files and block devices.
