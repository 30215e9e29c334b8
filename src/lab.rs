//! The workshop: what drives the agent from outside, kept apart from what ships.
//!
//! Nothing in the product imports this module (`tests/house.rs` checks it), so a change
//! here cannot change what the agent answers. It holds, each a user command or a tool:
//!
//! * [`sems`]: a simulated switch, writing snapshots and posting call events byte for byte
//!   as a yeti node does (`examples/switch.rs` runs it alone);
//! * [`demo`]: a newcomer's first run (`active-calls-agent demo`), fed by that switch;
//! * [`agent`]: the one driver of the real agent as a child process, its log and its
//!   memory, which `bench`, `soak` and the integration tests share;
//! * [`client`]: the small HTTP client that posts as a switch posts, and [`sse`], the
//!   reader of a live stream's bytes;
//! * [`bench`]: the performance benchmark (BENCHMARKS.md), one file per scenario, and
//!   [`soak`], a bounded run under load that checks every answer.

pub mod agent;
pub mod bench;
pub mod client;
pub mod demo;
pub mod sems;
pub mod soak;
pub mod sse;
