//! The daemons' limit on open files. Each group holds a few descriptors (its journal's active
//! segment, a replica per volume, its connection), so a site with thousands of groups needs
//! more than the usual soft limit of 1,024: a daemon raises its soft limit to the hard limit
//! the system allows, and says so.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises the soft limit on open files to the hard limit. Returns the limit now in force (the
/// old one if it could not be raised).
pub fn raise_limit() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 0 };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            log::debug!("open files: the soft limit is raised from {soft} to {hard}");
            hard
        }
        Err(e) => {
            log::warn!("open files: cannot raise the soft limit from {soft} to {hard} ({e}); each group holds a few descriptors");
            soft
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_limit_after_raising_is_the_hard_limit() {
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(super::raise_limit(), hard);
    }
}
