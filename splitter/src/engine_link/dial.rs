//! Which engine the link dials next (docs/ha.md, "Agents follow the owner"): the engine a
//! `Redirect` named, else the configured engines in turn, moving on after each failure.

use std::sync::Mutex;

use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::identity::server_name_of;

/// The engines an agent may dial, and the one it dials next.
#[derive(Debug)]
pub struct Dialer {
    /// The configured engines; the first is `agent.engine`.
    engines: Vec<String>,
    /// The server name of the first engine (`tls.server_name`, or its host).
    server_name: String,
    /// `tls.server_name` was given: every engine's certificate must carry it.
    fixed_name: bool,
    /// The address dialed next.
    next: Mutex<String>,
    /// The disks the last welcome asked to resync whole (a takeover), until taken.
    resync: Mutex<Vec<u16>>,
}

impl Dialer {
    /// `engines` is not empty.
    pub fn new(engines: Vec<String>, server_name: String, fixed_name: bool) -> Dialer {
        let next = Mutex::new(engines[0].clone());
        Dialer { engines, server_name, fixed_name, next, resync: Mutex::new(Vec::new()) }
    }

    /// The address to dial and the name its certificate must carry.
    pub fn target(&self) -> (String, String) {
        let addr = lock(&self.next).clone();
        let name = if self.fixed_name || addr == self.engines[0] { self.server_name.clone() } else { server_name_of(&addr) };
        (addr, name)
    }

    /// Dialing `addr` failed: the next configured engine after it is dialed next.
    pub fn failed(&self, addr: &str) {
        let i = self.engines.iter().position(|e| e == addr).map_or(0, |i| (i + 1) % self.engines.len());
        *lock(&self.next) = self.engines[i].clone();
    }

    /// The engine at `addr` answered with a redirect to `to` (empty: no owner known yet).
    pub fn redirected(&self, addr: &str, to: &str) {
        if to.is_empty() {
            self.failed(addr);
        } else {
            *lock(&self.next) = to.to_owned();
        }
    }

    /// The engine welcomed the link, asking to resync `disks` whole (a takeover, docs/ha.md).
    pub fn welcomed(&self, disks: Vec<u16>) {
        lock(&self.resync).extend(disks);
    }

    /// The disks to resync whole since the last call.
    pub fn take_resync(&self) -> Vec<u16> {
        std::mem::take(&mut *lock(&self.resync))
    }

    /// Every configured engine, for messages.
    pub fn describe(&self) -> String {
        self.engines.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_go_round_the_engines_and_a_redirect_goes_where_it_says() {
        let d = Dialer::new(vec!["a:1".into(), "b:1".into(), "c:1".into()], "first.example".into(), false);
        assert_eq!(d.target(), ("a:1".into(), "first.example".into()));
        d.failed("a:1");
        assert_eq!(d.target(), ("b:1".into(), "b".into()));
        d.failed("b:1");
        d.failed("c:1");
        assert_eq!(d.target().0, "a:1");
        d.redirected("a:1", "10.0.0.9:7100");
        assert_eq!(d.target(), ("10.0.0.9:7100".into(), "10.0.0.9".into()));
        d.failed("10.0.0.9:7100");
        assert_eq!(d.target().0, "a:1", "an unlisted engine that fails sends the link back to the list");
        d.redirected("a:1", "");
        assert_eq!(d.target().0, "b:1");
        let fixed = Dialer::new(vec!["a:1".into(), "b:1".into()], "engines.example".into(), true);
        fixed.failed("a:1");
        assert_eq!(fixed.target(), ("b:1".into(), "engines.example".into()));
    }
}
