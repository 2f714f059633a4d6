//! `hindsight failback`: after a failover, brings production back to the original site.
//! `prepare` turns the original site's disks into a target's group (seeded: its replicas are
//! those disks), so that the recovery site's production can be replicated onto them, shipping
//! only the regions that differ (docs/operations.md, "Failback").

use std::path::PathBuf;

use hindsight_consistency::config::{AgentConfig, TargetConfig};
use hindsight_target::seed::{reseed_after_failback, seed, Adopt, SeedVolume};

use crate::failure::Failure;
use crate::progress::human;

/// `hindsight failback` actions.
#[derive(clap::Subcommand, Debug)]
pub enum FailbackCommand {
    /// At the original site, before its target runs: make the group's original disks the
    /// replicas of a new group of this target, at the epoch the failover gave the group
    Prepare(PrepareArgs),
    /// At the recovery site, once production is back at the original site: keep the group's
    /// history as <group>.epoch-<E> and protect the group again from its promoted volumes
    Resume(ResumeArgs),
}

/// The target, group and epoch both steps name.
#[derive(clap::Args, Debug)]
pub struct GroupAtEpoch {
    /// target.toml of the target (prepare: at the original site; resume: at the recovery site),
    /// which must be stopped meanwhile
    #[arg(long)]
    pub config: PathBuf,
    /// Consistency group
    #[arg(long)]
    pub group: String,
    /// The group's epoch: for prepare, the one the failover gave it (it printed it; `hindsight
    /// history` at the recovery site shows it); for resume, the one the planned failover back to
    /// the original site gave it
    #[arg(long)]
    pub epoch: u64,
}

/// `hindsight failback resume` options.
#[derive(clap::Args, Debug)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub at: GroupAtEpoch,
}

/// `hindsight failback prepare` options.
#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub at: GroupAtEpoch,
    /// The original agent's agent.toml: its disks of the group are taken (repeat for each VM)
    #[arg(long = "agent-config", value_name = "FILE")]
    pub agent_configs: Vec<PathBuf>,
    /// A disk of the group, as VM/VOLUME=PATH (repeat), instead of or besides --agent-config
    #[arg(long = "volume", value_name = "VM/VOLUME=PATH")]
    pub volumes: Vec<String>,
}

fn parse_volume(s: &str) -> Result<SeedVolume, Failure> {
    let bad = || Failure::Config(format!("--volume {s:?}: write VM/VOLUME=PATH, e.g. erp-db/db-data=/srv/db-data.img"));
    let (who, path) = s.split_once('=').ok_or_else(bad)?;
    let (vm, name) = who.split_once('/').ok_or_else(bad)?;
    if vm.is_empty() || name.is_empty() || path.is_empty() {
        return Err(bad());
    }
    Ok(SeedVolume { name: name.to_owned(), vm: vm.to_owned(), path: PathBuf::from(path) })
}

pub fn run(command: &FailbackCommand) -> Result<(), Failure> {
    match command {
        FailbackCommand::Prepare(args) => prepare(args),
        FailbackCommand::Resume(args) => resume(args),
    }
}

fn resume(args: &ResumeArgs) -> Result<(), Failure> {
    let args = &args.at;
    let cfg = TargetConfig::load(&args.config).map_err(|e| Failure::Config(e.to_string()))?;
    crate::init_logging();
    let (archived, seeded) = reseed_after_failback(&cfg, &args.group, args.epoch)?;
    println!(
        "group {} protected again at epoch {}: its replicas are the volumes production left here; give the original site's \
         engine epoch = {} for the group and start it (its journal of the old epoch is set aside); the history up to the \
         failover is group {archived}",
        args.group, args.epoch, args.epoch
    );
    for s in &seeded {
        println!("  volume {} (vm {}, {})", s.name, s.vm, human(s.size));
    }
    Ok(())
}

fn prepare(args: &PrepareArgs) -> Result<(), Failure> {
    let at = &args.at;
    let cfg = TargetConfig::load(&at.config).map_err(|e| Failure::Config(e.to_string()))?;
    let mut volumes = Vec::new();
    for path in &args.agent_configs {
        let agent = AgentConfig::load(path).map_err(|e| Failure::Config(e.to_string()))?;
        for d in agent.disks.iter().filter(|d| d.group == at.group) {
            volumes.push(SeedVolume { name: d.volume.clone(), vm: agent.vm.clone(), path: d.path.clone() });
        }
    }
    for v in &args.volumes {
        volumes.push(parse_volume(v)?);
    }
    if volumes.is_empty() {
        return Err(Failure::Config(format!(
            "no disk of group {:?} given: name the original agents' configs (--agent-config) or the disks (--volume VM/VOLUME=PATH)",
            at.group
        )));
    }
    crate::init_logging();
    let seeded = seed(&cfg, &at.group, &volumes, at.epoch, Adopt::Link)?;
    println!(
        "group {} prepared for failback at epoch {}: this target's replicas are the original disks; start the target, then the \
         recovery site's engine (group epoch = {}) with its agents: they compare every region and ship those that differ",
        at.group, at.epoch, at.epoch
    );
    for (v, s) in volumes.iter().zip(&seeded) {
        println!("  {}  volume {} (vm {}, {})", v.path.display(), s.name, s.vm, human(s.size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_is_vm_slash_name_equals_path() {
        let Ok(v) = parse_volume("erp-db/db=/srv/db.img") else { panic!("parses") };
        assert_eq!((v.vm.as_str(), v.name.as_str(), v.path.to_str()), ("erp-db", "db", Some("/srv/db.img")));
        for bad in ["db=/srv/db.img", "erp-db/db", "/db=/x", "erp-db/=x", "erp-db/db="] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
    }
}
