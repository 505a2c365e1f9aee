//! Service-manager notifications (sd_notify(3), through the `sd-notify`
//! crate), for the packaged systemd unit (`Type=notify`):
//!
//! - `READY=1` once start-up is complete: the kernel probe passed and the
//!   gossip, handshake and control sockets are bound (the agent calls
//!   [`ready`] after the last of them).
//! - `STATUS=` with the peers alive and the links established, sent again only
//!   when that text changes.
//! - `WATCHDOG=1` every half `WATCHDOG_USEC` when the service manager set it
//!   (`WatchdogSec=`), and only while the agent's loops answer: the gossip
//!   state can be locked and the mesh driver replies to a ping. A wedged agent
//!   stops the keep-alives and systemd restarts it.
//! - `STOPPING=1` when the agent begins to stop.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use sd_notify::NotifyState;

use crate::gossip::members::{Member, MemberState};
use crate::mesh::driver::{MeshCommand, MeshReport};
use crate::mesh::{LinkState, LinkStatus};
use crate::shutdown::{self, StopReceiver};
use crate::throttle::LogThrottle;

/// The `STATUS=` text: peers (other members) alive and links established.
pub fn status_text(members: &[Member], links: &BTreeMap<String, Vec<LinkStatus>>) -> String {
    let peers = members.iter().filter(|m| !m.is_self);
    let alive = peers
        .clone()
        .filter(|m| m.state == MemberState::Alive)
        .count();
    let total = peers.count();
    let all_links = links.values().flatten();
    let established = all_links
        .clone()
        .filter(|l| l.state == LinkState::Established)
        .count();
    format!(
        "{alive}/{total} peers alive, {established}/{} links established",
        all_links.count()
    )
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        // Rare (the manager's socket went away); one line per minute at most.
        static THROTTLE: std::sync::OnceLock<LogThrottle> = std::sync::OnceLock::new();
        let throttle = THROTTLE.get_or_init(|| LogThrottle::new(Duration::from_secs(60)));
        if let Some(suppressed) = throttle.check(Instant::now(), "sd_notify") {
            warn!(error = %e, suppressed, "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }
}

/// Start-up is complete: `READY=1` with the first `STATUS=`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The agent begins to stop: `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// What the supervisor watches.
pub struct Watched {
    /// The membership view.
    pub members: watch::Receiver<Arc<Vec<Member>>>,
    /// The mesh driver's reports (links).
    pub report: watch::Receiver<Arc<MeshReport>>,
    /// The gossip state (locked to prove gossip is not wedged).
    pub chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    /// The mesh driver's command channel (pinged to prove it answers).
    pub mesh: mpsc::Sender<MeshCommand>,
}

/// Sends `STATUS=` on change and, when `watchdog` is set, `WATCHDOG=1` every
/// half period while the agent's loops answer, until the agent stops.
/// `watchdog` is [`sd_notify::watchdog_enabled`] in the agent.
pub async fn supervise(mut w: Watched, watchdog: Option<Duration>, mut stop: StopReceiver) {
    let mut last_status = String::new();
    let mut keepalive = watchdog.map(|period| {
        let mut t = tokio::time::interval((period / 2).max(Duration::from_millis(10)));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let unresponsive_log = LogThrottle::new(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown::fired(&mut stop) => return,
            r = w.members.changed() => if r.is_err() { return },
            r = w.report.changed() => if r.is_err() { return },
            _ = async {
                match keepalive.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                let period = watchdog.unwrap_or_default();
                // Bounded by a quarter period, so an answer always comes
                // before the manager's deadline.
                match tokio::time::timeout(period / 4, responsive(&w.chitchat, &w.mesh)).await {
                    Ok(true) => send(&[NotifyState::Watchdog]),
                    _ => {
                        if let Some(suppressed) = unresponsive_log.check(Instant::now(), "watchdog") {
                            warn!(suppressed, "gossip or the mesh driver did not answer in time; watchdog keep-alive withheld");
                        }
                    }
                }
                continue;
            }
        }
        let text = status_text(
            &w.members.borrow_and_update(),
            &w.report.borrow_and_update().links,
        );
        if text != last_status {
            send(&[NotifyState::Status(&text)]);
            last_status = text;
        }
    }
}

/// Do gossip and the mesh driver answer? Gossip's state lock is free within
/// the time, and the driver's loop replies to a ping.
async fn responsive(
    chitchat: &tokio::sync::Mutex<chitchat::Chitchat>,
    mesh: &mpsc::Sender<MeshCommand>,
) -> bool {
    drop(chitchat.lock().await);
    let (tx, rx) = oneshot::channel();
    if mesh.send(MeshCommand::Ping { reply: tx }).await.is_err() {
        return false;
    }
    rx.await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::AddressFamily;

    fn member(name: &str, state: MemberState, is_self: bool) -> Member {
        Member {
            name: name.into(),
            gossip_addr: "192.0.2.1:9340".parse().unwrap(),
            data_addrs: vec![],
            state,
            public_key: None,
            signing_key: None,
            generation: 1,
            handshake_port: None,
            protocol: None,
            last_heard_ms: 0,
            is_self,
        }
    }

    #[test]
    fn status_counts_peers_and_established_links() {
        let members = vec![
            member("a", MemberState::Alive, true),
            member("b", MemberState::Alive, false),
            member("c", MemberState::Dead, false),
        ];
        let link = |state| LinkStatus {
            family: AddressFamily::V4,
            local: "192.0.2.1".parse().unwrap(),
            remote: "192.0.2.2".parse().unwrap(),
            state,
            spi_in: None,
            spi_out: None,
            aead: None,
            established_at: None,
            inbound: Default::default(),
            outbound: Default::default(),
        };
        let mut links = BTreeMap::new();
        links.insert(
            "b".to_string(),
            vec![link(LinkState::Established), link(LinkState::Handshaking)],
        );
        links.insert("c".to_string(), vec![link(LinkState::None)]);
        assert_eq!(
            status_text(&members, &links),
            "1/2 peers alive, 1/3 links established"
        );
        assert_eq!(
            status_text(&members[..1], &BTreeMap::new()),
            "0/0 peers alive, 0/0 links established"
        );
    }
}
