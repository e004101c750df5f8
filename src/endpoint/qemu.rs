//! qemu-nbd child processes for non-raw images.
