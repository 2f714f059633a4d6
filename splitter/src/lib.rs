//! hindsight-agent, the in-guest splitter: serves local disks to the guest through block
//! front ends and replicates every write to the engine.
//!
//! Core types: a [`block::BlockDevice`] is what a front end serves, as a ublk device
//! ([`ublk::UblkDisk`]), through the kernel's nbd driver ([`nbd::kernel::KernelNbd`]) or on
//! an NBD socket ([`nbd::NbdServer`]); [`replicated::ReplicatedDisk`] is the device that
//! replicates, over a [`replicated::LocalDisk`] and the agent's one
//! [`engine_link::EngineLink`].
//!
//! How a guest write flows through the agent:
//!
//! 1. A front end reads the request (a ublk queue thread from its tag's descriptor, an NBD
//!    connection's task, on a thread of the NBD pool, from its socket) and calls [`block::BlockDevice::submit`] with a
//!    completion, or [`block::BlockDevice::submit_held`] when the NBD connection already
//!    holds the client's next request.
//! 2. [`replicated::ReplicatedDisk`] checks the range. With dirty tracking it first marks the
//!    write's regions in the [`dirty::DirtyMap`], on disk. It waits until no local write
//!    still in progress overlaps the range, and marks the range as in progress.
//! 3. With the range held, it hands the write to the [`engine_link::EngineLink`], which
//!    numbers it, keeps it as pending and sends it as one `Write` frame (held back to go with
//!    the next ones for `submit_held`; resync data while the disk is resyncing; a long
//!    write-zeroes or trim as several frames).
//! 4. It then applies the write to the local disk (`pwrite`, or zeroing; `fdatasync` for FUA):
//!    inline on the submitting thread for writes under 128 KiB, on one of the agent's four
//!    writer threads (shared by every disk) for larger ones, so that the front end reads the
//!    next request meanwhile.
//!    The range is released when the local write has finished.
//! 5. The link's ack reader receives the engine's `WriteAck` (in cdp mode: the write is
//!    durable in the engine's journal) and finishes the engine part.
//! 6. Whichever part finishes last runs the completion: with dirty tracking it unmarks the
//!    regions, or leaves them for a resync if the engine did not take the write. The front
//!    end then replies: a ublk queue commits the tag's result; an NBD connection sends the
//!    reply, those of one batch of acknowledgements together (under a [`block::Cork`]).
//!
//! If the engine connection drops, the link reconnects and sends the pending writes again in
//! their original order before any new one; see [`engine_link`]. Regions the replica may
//! lack are re-sent later by [`resync`].
//!
//! The modules:
//!
//! - [`block`]: the block trait the front ends serve, completions and the reply cork
//! - [`replicated`]: the replicating device (engine and local disk) and the local writer
//!   threads its disks share
//! - [`engine_link`]: the connection to the engine: writes, acknowledgements, reconnection,
//!   control frames
//! - [`dirty`]: the on-disk dirty map of regions the replica may lack
//! - [`resync`]: the resync thread, which compares and re-sends those regions
//! - [`quiesce`]: freezing and thawing the guest's file systems for a bookmark
//! - [`frontend`]: picks and creates the kernel block device of each disk (ublk or nbd)
//! - [`ublk`]: the ublk front end
//! - [`nbd`]: the NBD front end (server and kernel nbd driver)
//! - [`file_device`]: a plain file as a device, without replication (tests and baselines)
//! - [`metrics`]: the agent's Prometheus metrics (`agent.metrics_listen`)

pub mod block;
pub mod dirty;
pub mod engine_link;
pub mod file_device;
pub mod frontend;
pub mod metrics;
pub mod nbd;
pub mod quiesce;
pub mod replicated;
pub mod resync;
pub mod ublk;
