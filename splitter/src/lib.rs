//! hindsight-agent, the in-guest splitter: serves local disks to the guest through a block
//! front end and replicates every write to the engine.
//!
//! Core types: a [`block::BlockDevice`] is what a front end ([`nbd::NbdServer`]) serves;
//! [`replicated::ReplicatedDisk`] is the device that replicates, over a
//! [`replicated::LocalDisk`] and the agent's one [`engine_link::EngineLink`].
//!
//! How a guest write flows through the agent:
//!
//! 1. The NBD front end reads the request and calls [`block::BlockDevice::submit`] with a
//!    completion.
//! 2. [`replicated::ReplicatedDisk`] checks the range and hands the write to the
//!    [`engine_link::EngineLink`], which numbers it, keeps it as pending and sends it as one
//!    `Write` frame.
//! 3. The same thread then applies the write to the local disk (and syncs it for FUA).
//! 4. The link's ack reader receives the engine's `WriteAck` (in cdp mode: the write is
//!    durable in the engine's journal) and finishes the engine part.
//! 5. Whichever of the two parts finishes last runs the completion, and the front end replies
//!    to the client.
//!
//! If the engine connection drops, the link reconnects and sends the pending writes again in
//! their original order before any new one; see [`engine_link`].
//!
//! - [`block`]: the block trait the front ends serve
//! - [`nbd`]: the NBD front end
//! - [`file_device`]: a plain file as a device, without replication (tests and baselines)
//! - [`engine_link`]: the connection to the engine
//! - [`replicated`]: the replicating device

pub mod block;
pub mod dirty;
pub mod engine_link;
pub mod file_device;
pub mod frontend;
pub mod nbd;
pub mod quiesce;
pub mod replicated;
pub mod resync;
pub mod ublk;
