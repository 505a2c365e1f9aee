//! The agent: wires configuration, identity, gossip and the control API
//! together, and owns the single shutdown path.
//!
//! Start-up either completes or leaves nothing behind: secrets and the state
//! directory are checked first, sockets are bound next, and a freshly
//! generated node key or signing key is written only once everything else
//! succeeded. Everything the node publishes in gossip is signed by its
//! signing key (proto/records.md), and re-signed when it changes (leave).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatId, FailureDetectorConfig, ProtocolVersion,
};
use tokio::sync::{broadcast, watch};
use tracing::{error, info, warn};

use std::os::fd::{BorrowedFd, RawFd};

use crate::cert;
use crate::config::{AgentConfig, DatapathKind};
use crate::control::{self, ControlState, MemberCounts, Status};
use crate::datapath::{
    bypass_socket, offload, AddressFamily, Datapath, MemoryDatapath, ProbeReport, XfrmDatapath,
    XfrmMonitor,
};
use crate::gossip::members::{self, HeardTracker, Member, MemberState, Observed};
use crate::gossip::pins::{Conflicts, Pins};
use crate::gossip::records::{signed_key_values, RecordCounters, RecordTracker};
use crate::gossip::schema::{NodeInfo, KEY_CERT, PROTOCOL_VERSION};
use crate::gossip::trust::{TrustFilter, TrustReport};
use crate::handshake::StaticKeypair;
use crate::identity::{self, KeyOrigin, NodeKey, SigningKey};
use crate::mesh::driver::{bind_handshake_sockets, MeshChannels, MeshReport};
use crate::mesh::{Mesh, MeshConfig};
use crate::shutdown::{self, Stop, StopReceiver};
use crate::throttle::LogThrottle;

/// Chitchat cluster id; sealing already separates clusters, this only guards
/// against a meshsec gossip port being pointed at another chitchat user.
pub(crate) const CLUSTER_ID: &str = "meshsec-v1";
/// File in the state directory holding the last generation used.
const GENERATION_FILE: &str = "generation";
/// How often the membership view is recomputed.
pub(crate) const VIEW_INTERVAL: Duration = Duration::from_millis(250);

/// Why the agent stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad configuration or unusable local resources (exit status 2).
    #[error(transparent)]
    Start(#[from] StartError),
    /// Gossip stopped after start-up (exit status 1).
    #[error("gossip stopped: {0}")]
    GossipStopped(String),
}

/// Why the agent could not start; each names the flag or resource to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Secret files or the node key.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The kernel cannot carry what meshsec installs.
    #[error("kernel datapath: {0}")]
    Datapath(#[from] crate::datapath::DatapathError),
    /// The kernel's XFRM event socket.
    #[error("kernel datapath: cannot subscribe to XFRM events: {0}")]
    Monitor(std::io::Error),
    /// The handshake sockets.
    #[error(transparent)]
    HandshakeSockets(#[from] crate::mesh::driver::HandshakeSocketError),
    /// The handshake configuration (keyring).
    #[error(transparent)]
    Handshake(#[from] crate::handshake::ConfigError),
    /// The gossip transport's keyring.
    #[error(transparent)]
    GossipKeyring(#[from] crate::gossip::GossipError),
    /// Gossip could not start (the reason names `--listen` where it is a bind problem).
    #[error("{0}")]
    Gossip(String),
    /// The control socket.
    #[error(transparent)]
    Control(#[from] control::ControlSocketError),
    /// The metrics listener (`--metrics-listen`).
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsBindError),
    /// The identity pins in the state directory.
    #[error(transparent)]
    Pins(#[from] crate::gossip::pins::PinsError),
    /// The bindings and blocked pairs saved in the state directory.
    #[error("{0}")]
    Guard(String),
    /// A CA, certificate or blocklist file (names the flag and the file).
    #[error(transparent)]
    Trust(#[from] crate::cert::FileError),
}

/// The CA, blocklist and own certificate in force; replaced whole by a reload.
#[derive(Debug, Clone, Default)]
pub struct TrustState {
    /// Trusted CAs and the blocklist.
    pub trust: cert::Trust,
    /// This node's certificate, published in gossip.
    pub own: Option<cert::Certificate>,
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the CA, certificate and blocklist files and checks this node's
/// certificate against them (at start and on every reload).
pub fn load_trust(
    cfg: &AgentConfig,
    signing: &identity::SigningPublicKey,
    now: u64,
) -> Result<TrustState, cert::FileError> {
    let cas = cert::load_cas(&cfg.ca_files)?;
    let blocklist = match &cfg.blocklist_file {
        Some(p) => cert::Blocklist::load(p)?,
        None => cert::Blocklist::default(),
    };
    let own = match &cfg.cert_file {
        Some(p) => {
            let c = cert::load_cert_file("--cert", p)?;
            if cas.is_empty() {
                // No CA here (yet: a roll-out publishes certificates before
                // hosts require them): published as is; what hosts with a CA
                // will say is only warned about.
                if let Err(r) = c
                    .check_record(&cfg.node_name, signing, &cfg.data_addresses)
                    .and_then(|()| c.check_time(now))
                {
                    warn!(cert = %p.display(), reason = %r, "this node's certificate does not vouch for it: hosts with a CA will refuse its record");
                }
            } else {
                cert::check_own(&c, &cas, &cfg.node_name, signing, &cfg.data_addresses, now)
                    .map_err(|reason| cert::FileError {
                        flag: "--cert",
                        path: p.clone(),
                        reason,
                    })?;
            }
            Some(c)
        }
        None => None,
    };
    if blocklist.blocks(signing, own.as_ref()) {
        warn!("this node's own signing key or certificate is on the blocklist: every host refuses its record");
    }
    Ok(TrustState {
        trust: cert::Trust { cas, blocklist },
        own,
    })
}

/// What this node publishes: its certificate (if any) first, then the
/// signed record (proto/records.md, proto/certs.md).
fn published_record(
    info: &NodeInfo,
    name: &str,
    generation: u64,
    key: &SigningKey,
    own: Option<&cert::Certificate>,
) -> Vec<(String, String)> {
    let mut kv: Vec<(String, String)> = own
        .map(|c| (KEY_CERT.to_string(), c.to_text()))
        .into_iter()
        .collect();
    kv.extend(signed_key_values(info, name, generation, key));
    kv
}

/// Runs the agent until `shutdown` completes, then announces leaving, stops
/// every task and returns.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    // SIGHUP means reload; registered first so that an early one (say a
    // service manager's reload during start-up) cannot kill the agent.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| warn!(error = %e, "cannot watch SIGHUP; use meshsec reload"))
        .ok();
    let keyring = identity::load_keyring(&cfg.secret_files).map_err(StartError::from)?;
    let (node_key, origin) = NodeKey::load_or_generate(&cfg.state_dir).map_err(StartError::from)?;
    let pins = Arc::new(std::sync::Mutex::new(
        Pins::load(&cfg.state_dir).map_err(StartError::from)?,
    ));
    let (signing_key, signing_origin) =
        SigningKey::load_or_generate(&cfg.state_dir).map_err(StartError::from)?;
    let trust_state =
        load_trust(&cfg, &signing_key.public(), unix_now()).map_err(StartError::from)?;
    if let Some(c) = &trust_state.own {
        info!(cert = %c.fingerprint(), ca = %cert::key_id_text(&c.ca_key_id), not_after = c.not_after, cas = trust_state.trust.cas.len(), "certificate loaded");
    }
    let trust_state = Arc::new(std::sync::RwLock::new(trust_state));
    // Generations must grow across restarts even if the clock steps back,
    // or the live node would hide behind its own dead record.
    let last_generation = std::fs::read_to_string(cfg.state_dir.join(GENERATION_FILE))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        .max(last_generation.saturating_add(1));

    // The datapath is probed before anything is installed or bound: a kernel
    // without XFRM, ESP or the chosen AEAD stops the agent here, with the fix.
    let aead = cfg.esp_algorithm;
    let families: Vec<AddressFamily> = {
        let mut f: Vec<AddressFamily> = cfg
            .data_addresses
            .iter()
            .map(|a| AddressFamily::of(*a))
            .collect();
        f.sort();
        f.dedup();
        f
    };
    let (datapath, bypass, monitor, probe_report): (
        Box<dyn Datapath>,
        bool,
        Option<XfrmMonitor>,
        ProbeReport,
    ) = match cfg.datapath {
        DatapathKind::Kernel => {
            let mut x = XfrmDatapath::open().map_err(StartError::from)?;
            let report = x.probe(aead, &families).map_err(StartError::from)?;
            for f in &report.esp_offload.families {
                info!(family = %f.family, module = offload::module(f.family), state = %f.state, "ESP GSO offload");
            }
            if let Some(w) = offload::warning(&report.esp_offload) {
                warn!("{w}");
            }
            // Subscribed before the first reconcile, so no expiry goes unseen;
            // the notifications of the datapath's own writes are dropped.
            let monitor = XfrmMonitor::open(Some(x.portid())).map_err(StartError::Monitor)?;
            (Box::new(x), true, Some(monitor), report)
        }
        DatapathKind::Memory => {
            warn!("--datapath memory: handshakes run but NOTHING is installed in the kernel and no traffic is protected (tests only)");
            (
                Box::new(MemoryDatapath::new()),
                false,
                None,
                ProbeReport::default(),
            )
        }
    };
    let esp_offload = probe_report.esp_offload.by_key();
    let on_bind: Option<Arc<dyn Fn(RawFd) -> std::io::Result<()> + Send + Sync>> = if bypass {
        let family = AddressFamily::of(cfg.listen.ip());
        Some(Arc::new(move |fd: RawFd| {
            // SAFETY: the transport calls this with its open socket's descriptor.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            bypass_socket(fd, family).map_err(std::io::Error::other)
        }))
    } else {
        None
    };
    let handshake_sockets = bind_handshake_sockets(&cfg.data_addresses, cfg.handshake_port, bypass)
        .map_err(StartError::from)?;
    if !cfg.protect.is_empty() {
        all_local(&cfg.data_addresses).map_err(StartError::from)?;
    }
    let secrets: Vec<[u8; 32]> = keyring.iter().map(|s| *s.0).collect();
    let guard_path = cfg.state_dir.join(crate::mesh::GUARD_FILE);
    let saved_guard = crate::mesh::driver::load_guard(&guard_path).map_err(StartError::Guard)?;
    let mut mesh = Mesh::new(
        MeshConfig {
            algorithm: cfg.esp_algorithm,
            dead_grace: cfg.peer_grace,
            rekey_interval: cfg.rekey.interval,
            lifetimes: cfg.rekey.lifetimes(),
            ..MeshConfig::default()
        },
        StaticKeypair::from_private(*node_key.private()),
        &secrets,
        cfg.data_addresses.clone(),
        Instant::now(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
    .map_err(StartError::from)?;
    mesh.set_boot_id(crate::mesh::current_boot_id());
    mesh.set_protect(cfg.protect.clone());
    if let Some(saved) = &saved_guard {
        mesh.restore_guard(saved).map_err(|e| {
            StartError::Guard(format!(
                "--state-dir: {}: {e} (fix or remove the file; removing it forgets what fail-closed holds)",
                guard_path.display()
            ))
        })?;
    }

    let transport = crate::gossip::transport_for(&keyring, on_bind).map_err(StartError::from)?;
    let info = NodeInfo {
        public_key: Some(*node_key.public()),
        data_addrs: cfg.data_addresses.clone(),
        handshake_port: Some(cfg.handshake_port),
        protocol: Some(PROTOCOL_VERSION),
        left: false,
    };
    let chitchat_id = ChitchatId::new(cfg.node_name.clone(), generation, cfg.advertise);
    let chitchat_config = ChitchatConfig {
        chitchat_id,
        cluster_id: CLUSTER_ID.to_string(),
        gossip_interval: cfg.gossip_interval,
        listen_addr: cfg.listen,
        seed_nodes: cfg.seeds.iter().map(|s| s.to_string()).collect(),
        failure_detector_config: failure_detector(&cfg),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V1,
    };
    // What we publish; the view task puts it back if a peer's delta for our
    // own id writes over it (see gossip::own).
    let published = Arc::new(std::sync::Mutex::new(published_record(
        &info,
        &cfg.node_name,
        generation,
        &signing_key,
        trust_state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .own
            .as_ref(),
    )));
    let initial = published.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let gossip = spawn_chitchat(chitchat_config, initial, transport.as_transport())
        .await
        .map_err(|e| StartError::Gossip(gossip_open_error(&cfg, &e)))?;
    // Before any datagram reaches it: SYNs chitchat could not answer without crashing are
    // judged against its state (gossip::transport::digest).
    transport.attach(gossip.chitchat());

    let listener = match control::bind(&cfg.control_socket).await {
        Ok(l) => l,
        Err(e) => {
            let _ = gossip.shutdown().await;
            return Err(StartError::from(e).into());
        }
    };
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => match crate::metrics::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                let _ = gossip.shutdown().await;
                let _ = std::fs::remove_file(&cfg.control_socket);
                return Err(StartError::from(e).into());
            }
        },
        None => None,
    };
    if origin == KeyOrigin::Generated {
        if let Err(e) = node_key.persist(&cfg.state_dir) {
            let _ = gossip.shutdown().await;
            let _ = std::fs::remove_file(&cfg.control_socket);
            return Err(StartError::from(e).into());
        }
        info!(fingerprint = %identity::fingerprint(node_key.public()), dir = %cfg.state_dir.display(), "created node key");
    }
    if signing_origin == KeyOrigin::Generated {
        if let Err(e) = signing_key.persist(&cfg.state_dir) {
            let _ = gossip.shutdown().await;
            let _ = std::fs::remove_file(&cfg.control_socket);
            return Err(StartError::from(e).into());
        }
        info!(fingerprint = %signing_key.public().fingerprint(), dir = %cfg.state_dir.display(), "created signing key");
    }
    if let Err(e) = std::fs::write(
        cfg.state_dir.join(GENERATION_FILE),
        format!("{generation}\n"),
    ) {
        warn!(error = %e, "cannot record the generation in the state directory");
    }
    info!(
        node = %cfg.node_name, generation, listen = %cfg.listen, advertise = %cfg.advertise,
        fingerprint = %identity::fingerprint(node_key.public()),
        signing_fingerprint = %signing_key.public().fingerprint(), seeds = cfg.seeds.len(),
        "agent started"
    );

    let started = Instant::now();
    let (members_tx, members_rx) = watch::channel(Arc::new(Vec::<Member>::new()));
    // Nodes the view refuses for their name (see members::valid_name).
    let refused = Arc::new(AtomicUsize::new(0));
    let (records_tx, records_rx) = watch::channel(RecordCounters::default());
    let (conflicts_tx, conflicts_rx) = watch::channel(Conflicts::default());
    let (trust_tx, trust_rx) = watch::channel(TrustReport::default());
    let (changes_tx, _) = broadcast::channel(256);
    let (stop_tx, stop_rx) = shutdown::channel();

    let (report_tx, report_rx) = watch::channel(Arc::new(MeshReport::default()));
    let (links_tx, links_rx) = watch::channel(Arc::new(BTreeMap::new()));
    let status_fn = {
        let report_rx = report_rx.clone();
        let members_rx = members_rx.clone();
        let refused = refused.clone();
        let conflicts_rx = conflicts_rx.clone();
        let trust_rx = trust_rx.clone();
        let trust_state = trust_state.clone();
        let cfg = cfg.clone();
        let public = *node_key.public();
        let signing_public = signing_key.public();
        let counters = transport.counters();
        Arc::new(move || {
            let members = members_rx.borrow().clone();
            let mut counts = MemberCounts {
                refused: refused.load(Ordering::Relaxed),
                ..MemberCounts::default()
            };
            for m in members.iter() {
                match m.state {
                    MemberState::Alive => counts.alive += 1,
                    MemberState::Suspect => counts.suspect += 1,
                    MemberState::Dead => counts.dead += 1,
                    MemberState::Left => counts.left += 1,
                }
            }
            Status {
                name: cfg.node_name.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                public_key: identity::encode_public(&public),
                fingerprint: identity::fingerprint(&public),
                signing_fingerprint: signing_public.fingerprint(),
                generation,
                gossip_listen: cfg.listen.to_string(),
                gossip_advertise: cfg.advertise.to_string(),
                data_addrs: cfg.data_addresses.iter().map(|a| a.to_string()).collect(),
                handshake_port: cfg.handshake_port,
                protocol: PROTOCOL_VERSION,
                uptime_secs: started.elapsed().as_secs(),
                members: counts,
                gossip: counters.snapshot(),
                clock_offsets: counters.clock_offsets(
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                        .unwrap_or(0),
                ),
                records: *records_rx.borrow(),
                identity_conflicts: conflicts_rx.borrow().clone(),
                cert: {
                    let t = trust_state.read().unwrap_or_else(|e| e.into_inner());
                    t.own
                        .as_ref()
                        .map(|c| control::CertStatus::new(c, unix_now()))
                },
                cas: {
                    let t = trust_state.read().unwrap_or_else(|e| e.into_inner());
                    t.trust
                        .cas
                        .iter()
                        .map(|k| cert::key_id_text(&cert::key_id(k)))
                        .collect()
                },
                blocklisted: trust_state
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .trust
                    .blocklist
                    .0
                    .len(),
                trust_refusals: trust_rx.borrow().clone(),
                datapath: match cfg.datapath {
                    DatapathKind::Kernel => "kernel".into(),
                    DatapathKind::Memory => "memory".into(),
                },
                esp_algorithm: cfg.esp_algorithm.to_string(),
                esp_offload: esp_offload.clone(),
                handshake: report_rx.borrow().handshake.clone(),
                mesh: report_rx.borrow().counters.clone(),
                blocked: {
                    let now = Instant::now();
                    let report = report_rx.borrow();
                    report
                        .blocked
                        .iter()
                        .map(|b| control::BlockedRow::new(b, now))
                        .collect()
                },
                conflicts: report_rx.borrow().conflicts.clone(),
                protect: {
                    let report = report_rx.borrow();
                    control::ProtectStatus {
                        ranges: report.protect.iter().map(|r| r.to_string()).collect(),
                        policies: report.range_policies,
                    }
                },
            }
        })
    };

    let (mesh_cmd_tx, mesh_cmd_rx) = tokio::sync::mpsc::channel(16);
    let (leave_tx, mut leave_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel::<control::ReloadRequest>(4);
    let gossip_keyring = transport.keyring();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(l) = metrics_listener {
        info!(listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving Prometheus metrics at /metrics");
        tasks.spawn(crate::metrics::serve(
            l,
            crate::metrics::MetricsSource {
                status: status_fn.clone(),
                links: links_rx.clone(),
                xfrm_stat: crate::metrics::XFRM_STAT_PATH.into(),
            },
            stop_rx.clone(),
        ));
    }
    tasks.spawn(control::serve(
        listener,
        ControlState {
            members: members_rx.clone(),
            changes: changes_tx.clone(),
            status: status_fn,
            links: links_rx,
            mesh: mesh_cmd_tx.clone(),
            leave: leave_tx,
            reload: reload_tx,
            pins: pins.clone(),
            identity_conflicts: conflicts_rx.clone(),
            trust: trust_rx.clone(),
        },
        stop_rx.clone(),
    ));
    tasks.spawn(crate::mesh::driver::run(
        mesh,
        datapath,
        handshake_sockets,
        MeshChannels {
            members: members_rx.clone(),
            report: report_tx,
            commands: mesh_cmd_rx,
            guard_file: Some(guard_path),
        },
        stop_rx.clone(),
        monitor,
    ));
    // The listing's per-peer link columns follow the mesh's reports.
    {
        let mut report_rx = report_rx.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown::fired(&mut stop) => return,
                    r = report_rx.changed() => if r.is_err() { return },
                }
                let links = report_rx.borrow_and_update().links.clone();
                links_tx.send_replace(Arc::new(links));
            }
        });
    }
    tasks.spawn(serve_reloads(
        ReloadTargets {
            cfg: cfg.clone(),
            signing: signing_key.public(),
            trust: trust_state.clone(),
            published: published.clone(),
            chitchat: gossip.chitchat(),
        },
        gossip_keyring,
        mesh_cmd_tx.clone(),
        reload_rx,
        hangup,
        stop_rx.clone(),
    ));
    tasks.spawn(track_members(
        gossip.chitchat(),
        cfg.node_name.clone(),
        published.clone(),
        pins.clone(),
        trust_state.clone(),
        ViewOutputs {
            members_tx,
            changes_tx,
            refused,
            records_tx,
            conflicts_tx,
            trust_tx,
        },
        stop_rx.clone(),
    ));

    // Every socket is bound and served: tell systemd (Type=notify), then keep
    // its status line and watchdog fed (crate::notify).
    crate::notify::ready(&crate::notify::status_text(
        &members_rx.borrow(),
        &report_rx.borrow().links,
    ));
    tasks.spawn(crate::notify::supervise(
        crate::notify::Watched {
            members: members_rx.clone(),
            report: report_rx.clone(),
            chitchat: gossip.chitchat(),
            mesh: mesh_cmd_tx.clone(),
        },
        sd_notify::watchdog_enabled(),
        stop_rx.clone(),
    ));

    let mut gossip_died = Box::pin(gossip.termination_watcher());
    let (how, outcome) = tokio::select! {
        _ = shutdown => (Stop::Stop, Ok(())),
        Some(()) = leave_rx.recv() => (Stop::Leave, Ok(())),
        r = &mut gossip_died => (Stop::Stop, Err(AgentError::GossipStopped(gossip_stop_reason(r)))),
    };

    // The one shutdown path. A stop (SIGTERM/SIGINT, e.g. for an upgrade)
    // leaves the SAs and policies in the kernel, where they keep carrying
    // traffic until the agent is back and re-keys them; peers keep theirs
    // for the grace period. A leave (`meshsec leave`, or `--leave-on-stop`)
    // announces it, gives peers a few gossip rounds to hear it, and removes
    // everything meshsec installed here, as the peers do on their side.
    let how = if cfg.leave_on_stop { Stop::Leave } else { how };
    crate::notify::stopping();
    if how == Stop::Leave {
        info!("leaving the cluster: announcing it");
        // Re-signed: `left` counts only under this node's signature. The
        // changed values are written before the signature (chitchat versions
        // grow in that order), so peers see the new record as incomplete, not
        // forged, until the signature arrives.
        let left = NodeInfo { left: true, ..info };
        let record = published_record(
            &left,
            &cfg.node_name,
            generation,
            &signing_key,
            trust_state
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .own
                .as_ref(),
        );
        gossip
            .with_chitchat(|c| {
                // Under the gossip lock, as the view task reads it: the view
                // task never sees the new record published but not yet set
                // (it would put it back itself and count a forgery).
                *published.lock().unwrap_or_else(|e| e.into_inner()) = record.clone();
                let state = c.self_node_state();
                if crate::gossip::own::has_room(state, record.len()) {
                    for (k, v) in &record {
                        state.set(k, v);
                    }
                } else {
                    error!("cannot announce the leave: our gossip record's version was pushed to the top by a forged delta; peers keep their fail-closed policies for this node until meshsec forget");
                }
            })
            .await;
        tokio::time::sleep(cfg.gossip_interval * 3).await;
    } else {
        info!("stopping; SAs and policies stay in the kernel (meshsec leave removes them)");
    }
    stop_tx.send_replace(Some(how));
    while tasks.join_next().await.is_some() {}
    if let Err(e) = gossip.shutdown().await {
        warn!(error = %e, "gossip shutdown");
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    info!("agent stopped");
    outcome
}

/// One line saying why chitchat's task ended. It ends only on a broken socket or a panic
/// (whose message the panic hook has already printed above this line).
fn gossip_stop_reason(r: anyhow::Result<()>) -> String {
    match r {
        Ok(()) => "chitchat's task ended unexpectedly".to_string(),
        Err(e) if e.to_string().contains("panicked") => format!(
            "chitchat's task panicked (its message is logged just above; please report it): {e}; SAs and policies stay in the kernel until the agent is back"
        ),
        Err(e) => format!(
            "{}; SAs and policies stay in the kernel until the agent is back",
            e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
        ),
    }
}

/// Strict mode exempts traffic to our own data addresses inside a range: one
/// that is not this host's (a typo, a floating address that moved) would be an
/// exemption for somebody else's traffic, in clear (found in review). Checked
/// by binding each, as the handshake sockets prove the first of each family.
fn all_local(addrs: &[std::net::IpAddr]) -> Result<(), crate::mesh::driver::HandshakeSocketError> {
    for ip in addrs {
        if let Err(error) = std::net::UdpSocket::bind((*ip, 0)) {
            if error.kind() == std::io::ErrorKind::AddrNotAvailable {
                return Err(crate::mesh::driver::HandshakeSocketError::NotLocal { ip: *ip, error });
            }
        }
    }
    Ok(())
}

fn failure_detector(cfg: &AgentConfig) -> FailureDetectorConfig {
    failure_detector_for(cfg.gossip_interval, cfg.dead_node_grace)
}

/// The failure detector settings for a gossip interval and dead-node grace (the agent's, and
/// the simulation's in `gossip::sim`).
pub(crate) fn failure_detector_for(
    gossip_interval: Duration,
    dead_node_grace: Duration,
) -> FailureDetectorConfig {
    // Heartbeats arrive about once per gossip interval; with the phi accrual
    // detector a silent node crosses phi = 8 within a few seconds at the default
    // 0.5 s interval; the view adds a floor of `suspect_after` silence before
    // calling it dead, so the listing says dead within ~5-8 s. The detector
    // keeps a window of inter-arrival samples per peer: 100 (50 s of
    // heartbeats at 0.5 s) estimate the mean as well as chitchat's default
    // 1000 for 8 KB less per peer (8 MB at 1000 peers).
    FailureDetectorConfig {
        phi_threshold: 8.0,
        sampling_window_size: 100,
        max_interval: gossip_interval * 4,
        initial_interval: gossip_interval * 2,
        dead_node_grace_period: dead_node_grace,
    }
}

/// Words a failure to open gossip for the operator: a bind problem names
/// `--listen`, anything else (e.g. missing privileges) says what it is.
fn gossip_open_error(cfg: &AgentConfig, e: &anyhow::Error) -> String {
    use crate::gossip::transport::TransportError;
    match e.downcast_ref::<TransportError>() {
        Some(TransportError::Bind { error, .. }) => format!(
            "--listen: cannot bind the gossip socket to {}: {error}",
            cfg.listen
        ),
        Some(other) => other.to_string(),
        None => format!(
            "gossip: {}",
            e.chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ")
        ),
    }
}

/// Where the membership view and what it refused are published.
struct ViewOutputs {
    members_tx: watch::Sender<Arc<Vec<Member>>>,
    changes_tx: broadcast::Sender<Arc<(Vec<members::Change>, Vec<Member>)>>,
    refused: Arc<AtomicUsize>,
    records_tx: watch::Sender<RecordCounters>,
    conflicts_tx: watch::Sender<Conflicts>,
    trust_tx: watch::Sender<TrustReport>,
}

async fn track_members(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    self_name: String,
    published: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    pins: Arc<std::sync::Mutex<Pins>>,
    trust: Arc<std::sync::RwLock<TrustState>>,
    out: ViewOutputs,
    mut stop: StopReceiver,
) {
    let ViewOutputs {
        members_tx,
        changes_tx,
        refused,
        records_tx,
        conflicts_tx,
        trust_tx,
    } = out;
    let mut trust_filter = TrustFilter::default();
    let trust_log = LogThrottle::new(Duration::from_secs(10));
    let expiry_log = LogThrottle::new(Duration::from_secs(3600));
    let mut tracker = HeardTracker::default();
    let refused_log = LogThrottle::new(Duration::from_secs(60));
    let own_log = LogThrottle::new(Duration::from_secs(60));
    let mut own_restored = 0u64;
    let mut records = RecordTracker::default();
    let mut ticker = tokio::time::interval(VIEW_INTERVAL);
    let mut observed_cache = ObservedCache::default();
    loop {
        tokio::select! {
            _ = shutdown::fired(&mut stop) => return,
            _ = ticker.tick() => {}
        }
        let restored = {
            let mut c = chitchat.lock().await;
            // No await while the record is locked: compared in place, not copied each tick.
            let restored = {
                let record = published.lock().unwrap_or_else(|e| e.into_inner());
                crate::gossip::own::restore(c.self_node_state(), &record)
            };
            observed_cache.refresh(&c);
            restored
        };
        let observed = observed_cache.nodes();
        let now = Instant::now();
        if restored.exhausted {
            if let Some(suppressed) = own_log.check(now, "own_record_restored") {
                error!(suppressed, "a peer's delta for our id pushed our gossip record's version to the top (only a member holding the cluster secret can send one): it cannot be put back; restart the agent (a new generation publishes a fresh record)");
            }
        } else if !restored.is_empty() {
            own_restored += 1;
            if let Some(suppressed) = own_log.check(now, "own_record_restored") {
                warn!(rewritten = ?restored.rewritten, removed = ?restored.removed, suppressed, "our own gossip record was overwritten by a peer's delta for our id (only a member holding the cluster secret can send one); put back");
            }
        }
        let heard = tracker.observe(observed, now);
        let signed = records.observe(observed, now);
        let counters = RecordCounters {
            own_record_restored: own_restored,
            ..signed.counters
        };
        records_tx.send_if_modified(|c| std::mem::replace(c, counters) != counters);
        // The CA and the blocklist, before pinning: a refused identity is never pinned.
        let mut valid = signed.valid;
        let unix = unix_now();
        let (found, certs, own) = {
            let t = trust.read().unwrap_or_else(|e| e.into_inner());
            let (found, certs) = trust_filter.apply(&t.trust, observed, &mut valid, unix);
            (found, certs, t.own.as_ref().map(|c| c.not_after))
        };
        trust_tx.send_if_modified(|r| {
            if r.current == found && r.certs == certs {
                return false;
            }
            for f in r.update(found, certs) {
                if let Some(suppressed) = trust_log.check(now, "trust_refusal") {
                    warn!(peer = %f.name, reason = %f.reason, signing_key = %f.signing_fingerprint, generation = f.generation, suppressed, "record refused by the cluster CA or the blocklist; it gets no links");
                }
            }
            true
        });
        if let Some(not_after) = own {
            let left = not_after.saturating_sub(unix);
            if left < cert::EXPIRY_WARNING_SECS {
                if let Some(suppressed) = expiry_log.check(now, "own_cert_expiry") {
                    if left == 0 {
                        error!(not_after, suppressed, "this node's certificate has expired: every host refuses its record; install a new one (meshsec ca sign) and run meshsec reload");
                    } else {
                        warn!(not_after, days_left = left / 86_400, suppressed, "this node's certificate expires within 30 days; install a new one (meshsec ca sign) and run meshsec reload");
                    }
                }
            }
        }
        // Pinning: a name's first signing identity stays its identity.
        let found = pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply(&mut valid);
        conflicts_tx.send_if_modified(|c| {
            if c.current == found {
                return false;
            }
            for f in found.iter().filter(|f| !c.current.contains(f)) {
                c.total += 1;
                warn!(peer = %f.name, pinned = %f.pinned, offered = %f.offered, generation = f.generation, "record under a pinned name signed by another identity; refused (meshsec forget NAME accepts it)");
            }
            c.current = found;
            true
        });
        let next = members::view(observed, &heard, &valid, &self_name, now, suspect_after());
        let n_refused = members::refused_names(observed);
        refused.store(n_refused, Ordering::Relaxed);
        if n_refused > 0 {
            if let Some(suppressed) = refused_log.check(now, "refused_member_name") {
                // The names themselves are not logged: they are what is refused.
                warn!(refused = n_refused, suppressed, "gossip carries nodes whose name is not 1-63 characters of letters, digits, '-', '_' or '.': not listed, not linked");
            }
        }
        let changes = members::diff(&members_tx.borrow(), &next);
        for c in &changes {
            let (from, to) = (c.from_text(), c.to_text());
            info!(peer = %c.name, from = %from, to = %to, generation = c.generation, restarted = c.restarted, "membership changed");
        }
        if !changes.is_empty() {
            let _ = changes_tx.send(Arc::new((changes, next.clone())));
        }
        // The listing reads the newest view (its last-heard times) on
        // demand; the mesh and the service status wake only when something
        // other than a last-heard time changed (the mesh times a dead
        // member's grace itself).
        members_tx.send_if_modified(|v| {
            let changed = !members::same_but_heard(v, &next);
            *v = Arc::new(next);
            changed
        });
    }
}

pub(crate) fn suspect_after() -> Duration {
    Duration::from_secs(4)
}

/// The view's copy of chitchat's node states, refreshed in place each round:
/// a node whose key-values (and their versions) are those of the last round
/// keeps its copy, and only its heartbeat and liveness are updated, so an
/// idle round copies no strings (it copied every node's values every 250 ms).
#[derive(Debug, Default)]
pub(crate) struct ObservedCache {
    /// In chitchat's order (by id), with `ids` alongside.
    nodes: Vec<Observed>,
    ids: Vec<ChitchatId>,
}

impl ObservedCache {
    /// Brings the copy up to date with `c`.
    pub(crate) fn refresh(&mut self, c: &chitchat::Chitchat) {
        let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
        let dead: std::collections::HashSet<&ChitchatId> = c.dead_nodes().collect();
        let states = c.node_states();
        let old_ids = std::mem::replace(&mut self.ids, Vec::with_capacity(states.len()));
        let old_nodes = std::mem::replace(&mut self.nodes, Vec::with_capacity(states.len()));
        let mut old = old_ids.into_iter().zip(old_nodes).peekable();
        for (id, state) in states {
            // Both in id order: skip what chitchat forgot.
            while old.peek().is_some_and(|(o, _)| o < id) {
                old.next();
            }
            let kept = match old.peek() {
                Some((o, _)) if o == id => old.next().map(|(_, n)| n),
                _ => None,
            }
            .filter(|n| same_values(n, state));
            let mut node = kept.unwrap_or_else(|| Observed {
                name: id.node_id.to_string(),
                generation: id.generation_id,
                gossip_addr: id.gossip_advertise_addr,
                key_values: state
                    .key_values()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
                versions: state
                    .key_values_including_deleted()
                    .filter(|(_, v)| !v.is_deleted())
                    .map(|(k, v)| (k.to_string(), v.version))
                    .collect(),
                heartbeat: 0,
                live: false,
                dead: false,
            });
            node.heartbeat = u64::from(state.heartbeat());
            node.live = live.contains(id);
            node.dead = dead.contains(id);
            self.nodes.push(node);
            self.ids.push(id.clone());
        }
    }

    /// The nodes as of the last refresh.
    pub(crate) fn nodes(&self) -> &[Observed] {
        &self.nodes
    }
}

/// Whether `o` holds exactly `state`'s (non-deleted) key-values and versions.
fn same_values(o: &Observed, state: &chitchat::NodeState) -> bool {
    let mut theirs = state
        .key_values_including_deleted()
        .filter(|(_, v)| !v.is_deleted());
    let mut ours = o.key_values.iter().zip(&o.versions);
    if o.key_values.len() != o.versions.len() {
        return false;
    }
    loop {
        match (ours.next(), theirs.next()) {
            (None, None) => return true,
            (Some(((k, v), (k2, version))), Some((tk, tv)))
                if k == tk && k2 == tk && *v == tv.value && *version == tv.version => {}
            _ => return false,
        }
    }
}

/// What a reload re-reads and where it puts the result.
struct ReloadTargets {
    cfg: AgentConfig,
    signing: identity::SigningPublicKey,
    trust: Arc<std::sync::RwLock<TrustState>>,
    published: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
}

/// Reloads on `meshsec reload` and on SIGHUP: the secret files, the CA
/// files, this node's certificate, the blocklist and strict mode's ranges
/// (the config file's `protect`, unless `--protect` gave them) are read
/// again (same paths); if any cannot be used nothing changes, else the
/// handshakes, then gossip, use the new keyring, the view the new CAs and
/// blocklist, the mesh the new ranges, and a new certificate is published in
/// place of the old. Sessions and SAs stay.
async fn serve_reloads(
    targets: ReloadTargets,
    gossip_keyring: Arc<crate::gossip::seal::Keyring>,
    mesh: tokio::sync::mpsc::Sender<crate::mesh::driver::MeshCommand>,
    mut requests: tokio::sync::mpsc::Receiver<control::ReloadRequest>,
    mut hangup: Option<tokio::signal::unix::Signal>,
    mut stop: StopReceiver,
) {
    loop {
        let reply = tokio::select! {
            _ = shutdown::fired(&mut stop) => return,
            r = requests.recv() => match r {
                Some(tx) => Some(tx),
                None => return,
            },
            _ = async {
                match hangup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => None,
        };
        let result = reload(&targets, &gossip_keyring, &mesh).await;
        match &result {
            Ok(r) => {
                info!(secrets = r.secrets, key_ids = %r.key_ids.join(","), cas = r.cas, blocklisted = r.blocklisted, cert = r.cert.as_deref().unwrap_or("none"), protect = %r.protect.join(","), "cluster secret keyring reloaded, with the CAs, certificate, blocklist and protected ranges")
            }
            Err(e) => {
                warn!(error = %e, "keyring reload refused; the previous keyring stays in use")
            }
        }
        if let Some(tx) = reply {
            let _ = tx.send(result);
        }
    }
}

async fn reload(
    t: &ReloadTargets,
    gossip_keyring: &crate::gossip::seal::Keyring,
    mesh: &tokio::sync::mpsc::Sender<crate::mesh::driver::MeshCommand>,
) -> Result<control::Reloaded, control::ReloadError> {
    // Read everything first: a bad file changes nothing.
    let next = load_trust(&t.cfg, &t.signing, unix_now())?;
    let mut r = reload_keyring(&t.cfg, gossip_keyring, mesh).await?;
    r.cas = next.trust.cas.len();
    r.blocklisted = next.trust.blocklist.0.len();
    r.cert = next.own.as_ref().map(|c| c.fingerprint());
    let new_text = next.own.as_ref().map(|c| c.to_text());
    {
        // The certificate is outside the signed values: replacing it leaves
        // the signed record valid throughout (no link is touched).
        let mut c = t.chitchat.lock().await;
        let mut published = t.published.lock().unwrap_or_else(|e| e.into_inner());
        let old = published
            .iter()
            .find(|(k, _)| k == KEY_CERT)
            .map(|(_, v)| v.clone());
        if old != new_text {
            published.retain(|(k, _)| k != KEY_CERT);
            let state = c.self_node_state();
            match &new_text {
                Some(text) => {
                    published.insert(0, (KEY_CERT.to_string(), text.clone()));
                    state.set(KEY_CERT, text);
                }
                None => state.delete(KEY_CERT),
            }
        }
        *t.trust.write().unwrap_or_else(|e| e.into_inner()) = next;
    }
    Ok(r)
}

async fn reload_keyring(
    cfg: &AgentConfig,
    gossip_keyring: &crate::gossip::seal::Keyring,
    mesh: &tokio::sync::mpsc::Sender<crate::mesh::driver::MeshCommand>,
) -> Result<control::Reloaded, control::ReloadError> {
    // Everything is read and checked before anything changes.
    let protect = cfg.reload_protect()?;
    let secrets = zeroize::Zeroizing::new(
        identity::load_keyring(&cfg.secret_files)?
            .iter()
            .map(|s| *s.0)
            .collect::<Vec<[u8; 32]>>(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    let for_mesh = crate::mesh::driver::Secrets(secrets.clone());
    mesh.send(crate::mesh::driver::MeshCommand::SetKeyring {
        secrets: for_mesh,
        reply: tx,
    })
    .await
    .map_err(|_| control::ReloadError::MeshGone)?;
    rx.await.map_err(|_| control::ReloadError::MeshGone)??;
    gossip_keyring.replace(secrets.iter())?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    mesh.send(crate::mesh::driver::MeshCommand::SetProtect {
        ranges: protect.clone(),
        reply: tx,
    })
    .await
    .map_err(|_| control::ReloadError::MeshGone)?;
    rx.await.map_err(|_| control::ReloadError::MeshGone)?;
    Ok(control::Reloaded {
        protect: protect.iter().map(|r| r.to_string()).collect(),
        cas: 0,
        blocklisted: 0,
        cert: None,
        secrets: secrets.len(),
        key_ids: gossip_keyring
            .key_ids()
            .iter()
            .map(|k| k.to_string())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::Certificate;

    const NOW: u64 = 1_750_000_000;

    /// A config for node "n1" at 10.0.0.1 with a CA, a certificate and a
    /// blocklist in `dir`; returns it and the node's signing key.
    fn setup(dir: &std::path::Path) -> (AgentConfig, SigningKey, SigningKey) {
        let flags = crate::config::AgentFlags {
            node_name: Some("n1".into()),
            listen: Some("10.0.0.1:9340".into()),
            ca: vec![dir.join("ca.crt")],
            cert: Some(dir.join("n1.cert")),
            blocklist: Some(dir.join("blocklist")),
            ..Default::default()
        };
        let cfg = AgentConfig::merge(&flags, crate::config::FileConfig::default()).unwrap();
        let (_, ca_public) = cert::ca_init(&dir.join("ca.key"), false).unwrap();
        let ca = cert::load_ca_key(&dir.join("ca.key")).unwrap();
        assert_eq!(ca.public(), ca_public);
        std::fs::write(dir.join("blocklist"), "").unwrap();
        (cfg, ca, SigningKey::from_seed([5; 32]))
    }

    fn write_cert(
        dir: &std::path::Path,
        ca: &SigningKey,
        name: &str,
        key: &SigningKey,
        range: &str,
        not_after: u64,
    ) -> Certificate {
        let c = Certificate::issue(
            ca,
            name,
            key.public(),
            vec![range.parse().unwrap()],
            NOW - 10,
            not_after,
        )
        .unwrap();
        std::fs::write(dir.join("n1.cert"), c.to_text()).unwrap();
        c
    }

    #[test]
    fn own_certificate_and_trust_files_are_checked_with_errors_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (cfg, ca, key) = setup(d);
        let c = write_cert(d, &ca, "n1", &key, "10.0.0.0/24", NOW + 1000);
        let t = load_trust(&cfg, &key.public(), NOW).unwrap();
        assert_eq!(t.own, Some(c));
        assert_eq!(t.trust.cas, vec![ca.public()]);
        for (name, range, not_after, want) in [
            ("n2", "10.0.0.0/24", NOW + 1000, "issued to \"n2\""),
            ("n1", "10.9.0.0/24", NOW + 1000, "do not cover"),
            ("n1", "10.0.0.0/24", NOW, "expired"),
        ] {
            write_cert(d, &ca, name, &key, range, not_after);
            let e = load_trust(&cfg, &key.public(), NOW)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("--cert: ") && e.contains(want), "{e}");
        }
        write_cert(d, &ca, "n1", &key, "10.0.0.0/24", NOW + 1000);
        let e = load_trust(&cfg, &SigningKey::from_seed([6; 32]).public(), NOW)
            .unwrap_err()
            .to_string();
        assert!(e.contains("meshsec pubkey"), "{e}");
        std::fs::write(d.join("blocklist"), "zzz\n").unwrap();
        let e = load_trust(&cfg, &key.public(), NOW)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--blocklist: "), "{e}");
        std::fs::write(d.join("blocklist"), "").unwrap();
        std::fs::write(d.join("ca.crt"), "junk\n").unwrap();
        let e = load_trust(&cfg, &key.public(), NOW)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--ca: "), "{e}");
    }

    #[test]
    fn strict_mode_refuses_data_addresses_that_are_not_this_host_s() {
        let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let elsewhere: std::net::IpAddr = "198.51.100.254".parse().unwrap();
        all_local(&[local]).unwrap();
        let e = all_local(&[local, elsewhere]).unwrap_err().to_string();
        assert!(
            e.starts_with("--data-address: 198.51.100.254 is not an address of this host"),
            "{e}"
        );
    }

    #[test]
    fn the_certificate_is_published_before_the_signed_record() {
        let key = SigningKey::from_seed([5; 32]);
        let c = Certificate::issue(
            &SigningKey::from_seed([1; 32]),
            "n1",
            key.public(),
            vec!["10.0.0.0/24".parse().unwrap()],
            0,
            10,
        )
        .unwrap();
        let info = NodeInfo::default();
        let kv = published_record(&info, "n1", 1, &key, Some(&c));
        assert_eq!(kv[0], (KEY_CERT.to_string(), c.to_text()));
        assert_eq!(kv.last().unwrap().0, crate::gossip::schema::KEY_SIGNATURE);
        assert!(!published_record(&info, "n1", 1, &key, None)
            .iter()
            .any(|(k, _)| k == KEY_CERT));
    }
}

#[cfg(test)]
mod observed_cache_tests {
    use super::*;
    use chitchat::transport::ChannelTransport;
    use chitchat::{spawn_chitchat, ChitchatConfig, FailureDetectorConfig};

    /// The view's copy of chitchat's states: what a fresh copy would hold,
    /// every round, and an unchanged node's values are not copied again.
    #[tokio::test]
    async fn an_idle_round_copies_no_values_and_a_change_is_seen() {
        let addr: std::net::SocketAddr = "127.0.0.1:10001".parse().unwrap();
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new("a".to_string(), 1, addr),
            cluster_id: "test".into(),
            gossip_interval: Duration::from_millis(5),
            listen_addr: addr,
            seed_nodes: Vec::new(),
            failure_detector_config: FailureDetectorConfig::default(),
            marked_for_deletion_grace_period: Duration::from_secs(60),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V1,
        };
        let transport = ChannelTransport::with_mtu(65_507);
        let kv = vec![("k".to_string(), "v1".to_string())];
        let handle = spawn_chitchat(config, kv, &transport).await.unwrap();
        let chitchat = handle.chitchat();
        let c = chitchat.lock().await;
        let fresh = |c: &chitchat::Chitchat| {
            let mut f = ObservedCache::default();
            f.refresh(c);
            f.nodes
        };
        let mut cache = ObservedCache::default();
        cache.refresh(&c);
        let same = |a: &[Observed], b: &[Observed]| format!("{a:?}") == format!("{b:?}");
        assert!(same(cache.nodes(), &fresh(&c)));
        let copied_at = cache.nodes()[0].key_values["k"].as_ptr();
        // Rounds where only the heartbeat moved (a gossip round each 5 ms):
        // same copy, new heartbeat.
        let hb0 = cache.nodes()[0].heartbeat;
        drop(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = chitchat.lock().await;
        cache.refresh(&c);
        let hb = u64::from(c.self_node_state().heartbeat());
        assert!(hb > hb0, "the heartbeat moved: {hb0} -> {hb}");
        assert_eq!(cache.nodes()[0].heartbeat, hb);
        assert!(same(cache.nodes(), &fresh(&c)));
        assert_eq!(
            cache.nodes()[0].key_values["k"].as_ptr(),
            copied_at,
            "an unchanged node's values are not copied again"
        );
        // A changed value, a new key and a deleted key are all seen.
        c.self_node_state().set("k", "v2");
        cache.refresh(&c);
        assert_eq!(cache.nodes()[0].key_values["k"], "v2");
        c.self_node_state().set("k2", "x");
        cache.refresh(&c);
        assert!(same(cache.nodes(), &fresh(&c)));
        c.self_node_state().delete("k");
        cache.refresh(&c);
        assert!(!cache.nodes()[0].key_values.contains_key("k"));
        assert!(same(cache.nodes(), &fresh(&c)));
        drop(c);
        let _ = handle.shutdown().await;
    }
}
