//! NBD protocol constants and sans-IO codecs.
