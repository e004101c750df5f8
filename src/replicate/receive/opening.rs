//! How a receiver stream opens: its first frame must be a HELLO the
//! protocol accepts, and an incremental HELLO must be followed by its PLAN,
//! whose digest is the HELLO's. What the opening yields is the request to
//! attach the stream to its job (see `session.rs`).

use super::events::AttachRequest;
use super::job::Refusal;
use super::pass::check_plan;
use crate::wire::{ErrorCode, Features, Frame, Hello, PassMode};

/// What a stream's first frame leads to.
pub(super) enum Opening {
    /// An incremental HELLO: its PLAN must follow.
    AwaitPlan(Box<Hello>),
    /// Attach to the job.
    Attach(AttachRequest),
}

/// The first frame of a stream, which must be HELLO.
pub(super) fn first_frame(frame: Frame) -> Result<Opening, Refusal> {
    let Frame::Hello(hello) = frame else {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            format!(
                "the first frame of a stream must be HELLO, got {}",
                frame.frame_type().name()
            ),
        ));
    };
    if !hello.features.contains(Features::BLAKE3) {
        return Err(Refusal::new(
            ErrorCode::BadRequest,
            "the sender does not offer BLAKE3 digests, which the protocol requires",
        ));
    }
    if hello.mode == PassMode::Incremental {
        return Ok(Opening::AwaitPlan(Box::new(hello)));
    }
    Ok(Opening::Attach(AttachRequest {
        hello,
        plan: Vec::new(),
    }))
}

/// The frame after an incremental HELLO: its PLAN, whose digest must be
/// the HELLO's (the frame's size was bounded before it was read).
pub(super) fn plan_frame(hello: Hello, frame: Frame) -> Result<AttachRequest, Refusal> {
    let Frame::Plan(plan) = frame else {
        return Err(Refusal::new(
            ErrorCode::Protocol,
            format!(
                "an incremental HELLO must be followed by PLAN, got {}",
                frame.frame_type().name()
            ),
        ));
    };
    check_plan(&hello, &plan)?;
    Ok(AttachRequest { hello, plan })
}
