//! Network replication: `diskferry send` (the sender, on the source host)
//! and `diskferry serve` (the receiver, on the target host).
pub mod send;
pub mod stream;
