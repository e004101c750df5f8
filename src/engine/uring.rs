//! io_uring engine.
use super::{Completion, Engine, EngineKind, Op};
pub struct UringEngine;
impl UringEngine {
    pub fn new(_max_in_flight: u32) -> std::io::Result<Self> {
        todo!()
    }
}
pub fn probe() -> Result<(), String> {
    todo!()
}
impl Engine for UringEngine {
    fn push(&mut self, _u: u64, _op: Op) -> std::io::Result<()> {
        todo!()
    }
    fn wait(&mut self, _m: usize, _out: &mut Vec<Completion>) -> std::io::Result<()> {
        todo!()
    }
    fn in_flight(&self) -> usize {
        todo!()
    }
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }
}
