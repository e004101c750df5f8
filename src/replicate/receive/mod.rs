//! `diskferry serve`, the receiving end of a replication.
//!
//! * [`serve`]: the accept loop, its options and their checks.
//! * `conn`: one stream's I/O loop (a thread per connection): it reads and
//!   decodes frames, feeds them to the stream's protocol state machine
//!   (`session`), carries out what the machine asks on the job's target and
//!   gives the results back.
//! * `unpack`: DATA checks and decompression; `written`: a stream's written
//!   ranges and when they are flushed; `verify`: the read-back pass;
//!   `digests`: a delta job's block digests of the target.
//! * `job` and `registry`: the jobs in progress, their journals and targets
//!   (targets themselves are named, opened and written by `target`).
//! * [`limits`]: the caps on peers; `transport`: the TLS / TCP byte stream.

mod conn;
mod digests;
mod ending;
mod events;
mod intake;
mod job;
pub mod limits;
mod pass;
mod registry;
pub mod serve;
mod session;
mod target;
mod timers;
mod transport;
mod unpack;
mod verify;
mod written;
