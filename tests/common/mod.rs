//! System-test harness: starts the real `hindsight target`, `hindsight engine` and one
//! `hindsight-agent` per VM on 127.0.0.1 with file-backed disks in a temporary directory, and
//! kills them by PID when dropped.
//!
//! - `process`: the binaries, running commands with a timeout, waiting for ports and paths;
//! - `cluster`: the test cluster (target, engine, agents), its configs, certificates and
//!   processes;
//! - `observe`: what the cluster says (status, history, logs, journals) and waiting on it,
//!   recovering its images;
//! - `model`: the model of a volume, seeded random data, comparisons;
//! - `clients`: the real clients the tests drive (qemu-io, nbdfuse + loop + ext4);
//! - `failover`: failover and failback across the cluster's two sites;
//! - `monitoring`: HTTP GETs of a metrics address, promtool, a real Prometheus server;
//! - `wan`: a WAN emulator between engine and target;
//! - `etcd`: a real etcd of one or three members, for engine clusters;
//! - `engines`: three clustered engines beside the target, agents and etcd.

#![allow(dead_code)]

mod clients;
mod cluster;
mod engines;
mod etcd;
mod failover;
mod model;
mod monitoring;
mod observe;
mod process;
pub mod wan;

// Each test binary uses part of the harness.
#[allow(unused_imports)]
pub use clients::*;
pub use cluster::*;
#[allow(unused_imports)]
pub use engines::*;
#[allow(unused_imports)]
pub use etcd::*;
#[allow(unused_imports)]
pub use failover::*;
#[allow(unused_imports)]
pub use model::*;
#[allow(unused_imports)]
pub use monitoring::*;
pub use process::*;
