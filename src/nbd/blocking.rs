//! Blocking driver for [`super::conn::ClientConn`].
