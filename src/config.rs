//! Agent configuration: command-line flags merged over an optional TOML file.
//!
//! Every problem is a [`ConfigError`] whose message names the flag or key and the
//! reason, because the operator reads it as one line on stderr.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};

use crate::aead::Aead;
use crate::datapath::Prefix;
use std::time::Duration;

use serde::Deserialize;

/// Default `--dead-node-grace-secs`: chitchat drops a dead generation from its digest after
/// half of it, and the digest is what limits the cluster size (docs/scale.md), so a rolling
/// restart counts every restarted host twice for 5 minutes (it was 30 with the former 1 h).
pub const DEFAULT_DEAD_NODE_GRACE_SECS: u64 = 600;

/// Default UDP port for gossip.
pub const DEFAULT_GOSSIP_PORT: u16 = 9340;
/// Default UDP port for pairwise handshakes.
pub const DEFAULT_HANDSHAKE_PORT: u16 = 9341;
/// Default state directory (node key).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshsec";
/// Default control socket path.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/meshsec/control.sock";
/// Default cluster secret file.
pub const DEFAULT_SECRET_FILE: &str = "/etc/meshsec/cluster.secret";

/// A configuration problem, worded for the operator: `<flag or key>: <reason>`.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    /// The flag or config key at fault, e.g. `--seed` or `config key "listen"`.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// A new error for `key`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Which datapath the agent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatapathKind {
    /// The kernel's XFRM tables (the only one that protects traffic).
    Kernel,
    /// An in-memory model: handshakes run, nothing is installed, nothing is
    /// protected. For tests and simulations on kernels without ESP.
    Memory,
}

/// The config file's schema. Unknown keys are an error, so a typo never
/// silently falls back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Seed addresses, `HOST:PORT`.
    pub seeds: Option<Vec<String>>,
    /// Gossip bind address.
    pub listen: Option<String>,
    /// Address other nodes use to reach this one.
    pub advertise: Option<String>,
    /// Cluster secret keyring (first seals).
    pub secret_files: Option<Vec<PathBuf>>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Node name (default: hostname).
    pub node_name: Option<String>,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// `text` or `json`.
    pub log_format: Option<LogFormat>,
    /// Handshake UDP port.
    pub handshake_port: Option<u16>,
    /// Data-plane addresses published to peers (default: the advertised address).
    pub data_addresses: Option<Vec<String>>,
    /// Seconds between gossip rounds, as a float.
    pub gossip_interval_secs: Option<f64>,
    /// Seconds a dead node stays listed before it is forgotten.
    pub dead_node_grace_secs: Option<u64>,
    /// `kernel` or `memory`.
    pub datapath: Option<DatapathKind>,
    /// Cluster-wide ESP transform.
    pub esp_algorithm: Option<Aead>,
    /// Seconds a silent (dead) peer keeps its SAs.
    pub peer_grace_secs: Option<u64>,
    /// Treat SIGTERM/SIGINT as a leave (remove everything meshsec installed).
    pub leave_on_stop: Option<bool>,
    /// Seconds between time-based re-keys of a link (± 10 %).
    pub rekey_interval_secs: Option<u64>,
    /// Re-key a link once one of its SAs has carried this many bytes.
    pub rekey_after_bytes: Option<u64>,
    /// Re-key a link once one of its SAs has carried this many packets.
    pub rekey_after_packets: Option<u64>,
    /// Serve Prometheus metrics over HTTP on this `ADDR:PORT` (default: off).
    pub metrics_listen: Option<String>,
    /// Strict mode: CIDR ranges whose traffic with this host is never plaintext.
    pub protect: Option<Vec<String>>,
    /// Trusted CA certificate files (`ca.crt`); with any, every record needs a certificate.
    pub ca: Option<Vec<PathBuf>>,
    /// This node's certificate file.
    pub cert: Option<PathBuf>,
    /// Blocklist file of certificate or signing key fingerprints.
    pub blocklist: Option<PathBuf>,
}

/// Flag values, as parsed by the CLI (all optional: flags win over the file).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct AgentFlags {
    /// TOML config file; flags win over its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seed address HOST:PORT (repeatable; one is enough to join; none = first node).
    #[arg(long = "seed", value_name = "HOST:PORT")]
    pub seeds: Vec<String>,
    /// Gossip bind address (IPv4 or IPv6), default 0.0.0.0:9340.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Address others use to reach this node, ADDR or ADDR:PORT
    /// (default: the source address of the route towards the first seed).
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub advertise: Option<String>,
    /// Cluster secret file (repeatable: a keyring; the first seals, all open).
    #[arg(long = "secret-file", value_name = "FILE")]
    pub secret_files: Vec<PathBuf>,
    /// Directory holding the node key (default /var/lib/meshsec).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Node name (default: hostname).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Control socket path (default /run/meshsec/control.sock).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Handshake UDP port (default 9341).
    #[arg(long, value_name = "PORT")]
    pub handshake_port: Option<u16>,
    /// Data-plane address to publish (repeatable; default: the advertised address).
    #[arg(long = "data-address", value_name = "ADDR")]
    pub data_addresses: Vec<String>,
    /// Seconds a dead node stays listed before it is forgotten (default 600).
    #[arg(long, value_name = "SECS")]
    pub dead_node_grace_secs: Option<u64>,
    /// Datapath: kernel (default) or memory (tests only: protects nothing).
    #[arg(long, value_enum, value_name = "KIND")]
    pub datapath: Option<DatapathKind>,
    /// Cluster-wide ESP transform (default aes128-gcm; every host must agree).
    #[arg(long, value_enum, value_name = "ALG")]
    pub esp_algorithm: Option<Aead>,
    /// Seconds a silent peer keeps its SAs before they are removed (default 60).
    #[arg(long, value_name = "SECS")]
    pub peer_grace_secs: Option<u64>,
    /// On SIGTERM/SIGINT leave the cluster and remove everything meshsec
    /// installed, instead of stopping with the SAs left in place.
    #[arg(long)]
    pub leave_on_stop: bool,
    /// Re-key every link this often, in seconds, ± 10 % (default 3600).
    #[arg(long, value_name = "SECS")]
    pub rekey_interval_secs: Option<u64>,
    /// Also re-key a link once one of its SAs has carried this many bytes
    /// (kernel soft limit; default: no limit).
    #[arg(long, value_name = "BYTES")]
    pub rekey_after_bytes: Option<u64>,
    /// Also re-key a link once one of its SAs has carried this many packets
    /// (kernel soft limit; default: no limit).
    #[arg(long, value_name = "PACKETS")]
    pub rekey_after_packets: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics, bound to exactly
    /// that address (default: off).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    /// Strict mode: traffic between this host and CIDR is never sent or
    /// accepted in clear; only members with SAs get through (repeatable).
    #[arg(long = "protect", value_name = "CIDR")]
    pub protect: Vec<String>,
    /// Trusted cluster CA certificate (repeatable: several CAs during a CA
    /// rotation). With one, a member counts only with a valid certificate.
    #[arg(long = "ca", value_name = "FILE")]
    pub ca: Vec<PathBuf>,
    /// This node's certificate (`meshsec ca sign`), published in gossip;
    /// required with --ca. Re-read by `meshsec reload`.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Fingerprints (certificates or signing keys) whose records are
    /// refused, one a line. Re-read by `meshsec reload`.
    #[arg(long, value_name = "FILE")]
    pub blocklist: Option<PathBuf>,
}

/// When links re-key. Byte and packet limits become the SAs' kernel soft
/// limits (the kernel announces reaching them); the hard limits, at which
/// the kernel deletes an SA, are a safety net at twice the soft ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RekeyPolicy {
    /// Time-based re-key interval (± 10 % jitter).
    pub interval: Duration,
    /// Soft byte limit, if any.
    pub after_bytes: Option<u64>,
    /// Soft packet limit, if any.
    pub after_packets: Option<u64>,
}

impl RekeyPolicy {
    /// The SA lifetimes this policy installs.
    pub fn lifetimes(&self) -> crate::datapath::Lifetimes {
        crate::mesh::sa_lifetimes(self.after_bytes, self.after_packets)
    }
}

impl Default for RekeyPolicy {
    fn default() -> Self {
        RekeyPolicy {
            interval: Duration::from_secs(3600),
            after_bytes: None,
            after_packets: None,
        }
    }
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Seed addresses, resolved.
    pub seeds: Vec<SocketAddr>,
    /// Gossip bind address.
    pub listen: SocketAddr,
    /// Gossip address advertised to peers.
    pub advertise: SocketAddr,
    /// Cluster secret keyring files, first seals.
    pub secret_files: Vec<PathBuf>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Node name.
    pub node_name: String,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// Handshake port.
    pub handshake_port: u16,
    /// Data-plane addresses published to peers.
    pub data_addresses: Vec<IpAddr>,
    /// Gossip round interval.
    pub gossip_interval: Duration,
    /// How long a dead node stays listed.
    pub dead_node_grace: Duration,
    /// Datapath.
    pub datapath: DatapathKind,
    /// ESP transform.
    pub esp_algorithm: Aead,
    /// How long a silent peer keeps its SAs.
    pub peer_grace: Duration,
    /// SIGTERM/SIGINT means leave.
    pub leave_on_stop: bool,
    /// When links re-key.
    pub rekey: RekeyPolicy,
    /// Where the Prometheus endpoint listens, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Strict mode's protected ranges.
    pub protect: Vec<Prefix>,
    /// The ranges came from `--protect` (a reload keeps them) rather than
    /// the config file (a reload reads them again).
    pub protect_from_flags: bool,
    /// The config file, if any (a reload reads `protect` from it again).
    pub config_file: Option<PathBuf>,
    /// Trusted CA certificate files (empty: no CA).
    pub ca_files: Vec<PathBuf>,
    /// This node's certificate file.
    pub cert_file: Option<PathBuf>,
    /// The blocklist file.
    pub blocklist_file: Option<PathBuf>,
}

/// Parses and checks strict mode's ranges; `key` names the flag or key.
/// Each must be a CIDR range with no host bits set that keeps clear of
/// loopback, link-local, multicast and the unspecified address (traffic a
/// peer can never key, which the host needs); duplicates are merged.
pub fn parse_protect(key: &str, texts: &[String]) -> Result<Vec<Prefix>, ConfigError> {
    let mut out: Vec<Prefix> = Vec::new();
    for t in texts {
        let p: Prefix = t.trim().parse().map_err(|r| ConfigError::new(key, r))?;
        if let Some((what, r)) = crate::datapath::protect::reserved_overlap(&p) {
            return Err(ConfigError::new(
                key,
                format!("{p} overlaps {r} ({what}), which must stay reachable in clear; protect the hosts' own ranges"),
            ));
        }
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

impl AgentConfig {
    /// Strict mode's ranges as a reload sees them: `--protect` flags stay
    /// as given; otherwise the config file's `protect` key is read again
    /// (a file without it, or no file, protects nothing).
    pub fn reload_protect(&self) -> Result<Vec<Prefix>, ConfigError> {
        if self.protect_from_flags {
            return Ok(self.protect.clone());
        }
        match &self.config_file {
            None => Ok(Vec::new()),
            Some(path) => {
                let file = read_file(path)?;
                let key = "config key \"protect\"";
                let protect = parse_protect(key, &file.protect.unwrap_or_default())?;
                protect_fits_listen(key, &protect, self.listen)?;
                Ok(protect)
            }
        }
    }
}

/// The gossip socket is exempt from strict mode by a socket policy of its own
/// family; the kernel ignores it for the other family, so a dual-stack `[::]`
/// socket's IPv4 gossip would be dropped by an IPv4 range (found in review).
fn protect_fits_listen(
    key: &str,
    protect: &[Prefix],
    listen: SocketAddr,
) -> Result<(), ConfigError> {
    let v4 = protect.iter().find(|p| p.addr().is_ipv4());
    match (v4, listen.ip()) {
        (Some(p), IpAddr::V6(ip)) if ip.is_unspecified() => Err(ConfigError::new(
            key,
            format!("{p} is IPv4 but gossip listens on {listen}, a dual-stack socket whose IPv4 gossip strict mode would drop; listen on 0.0.0.0 or an IPv4 address"),
        )),
        _ => Ok(()),
    }
}

/// Reads and parses a TOML config file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    parse_file(&text)
        .map_err(|e| ConfigError::new(e.key, format!("{} (in {})", e.reason, path.display())))
}

/// Parses the TOML text of a config file.
pub fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        // toml's message for deny_unknown_fields is "unknown field `x`, expected one of …".
        let key = msg
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            .map(|k| k.to_string())
            .or_else(|| {
                // A bad value: name the key written at the start of the offending line.
                let span = e.span()?;
                let start = text[..span.start.min(text.len())]
                    .rfind('\n')
                    .map(|i| i + 1)
                    .unwrap_or(0);
                let line = &text[start..];
                let k = line.split('=').next()?.trim();
                (!k.is_empty() && !k.contains(['[', '"', ' '])).then(|| k.to_string())
            })
            .map(|k| format!("config key \"{k}\""))
            .unwrap_or_else(|| "config file".to_string());
        let first_line = msg.lines().next().unwrap_or("invalid TOML").to_string();
        let reason = match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("{first_line} at line {line}")
            }
            None => first_line,
        };
        ConfigError::new(key, reason)
    })
}

/// Validates a `HOST:PORT` seed and resolves it.
pub fn parse_seed(s: &str) -> Result<SocketAddr, ConfigError> {
    parse_seed_as("--seed", s)
}

fn parse_seed_as(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    let bad = |r: &str| ConfigError::new(key, format!("{s:?} {r}"));
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(bad("has port 0"));
        }
        return Ok(addr);
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| bad("is not HOST:PORT (port missing)"))?;
    if host.is_empty() || host.contains(':') {
        return Err(bad("is not HOST:PORT (IPv6 needs brackets: [ADDR]:PORT)"));
    }
    let port: u16 = port.parse().map_err(|_| bad("has an invalid port"))?;
    if port == 0 {
        return Err(bad("has port 0"));
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(&format!("does not resolve: {e}")))?
        .next()
        .ok_or_else(|| bad("resolves to no address"))
}

fn parse_listen(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse::<SocketAddr>()
        .map_err(|_| ConfigError::new(key, format!("{s:?} is not ADDR:PORT (IPv6 as [ADDR]:PORT)")))
}

/// Names a setting by where its value came from: the flag, or the file's key.
fn source(flag: &str, file_key: &str, from_flag: bool) -> String {
    if from_flag {
        flag.to_string()
    } else {
        format!("config key \"{file_key}\"")
    }
}

fn parse_advertise(key: &str, s: &str, default_port: u16) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let ip_text = s.trim_start_matches('[').trim_end_matches(']');
    ip_text
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| ConfigError::new(key, format!("{s:?} is not ADDR or ADDR:PORT")))
}

fn parse_ip(key: &str, s: &str) -> Result<IpAddr, ConfigError> {
    s.parse::<IpAddr>()
        .map_err(|_| ConfigError::new(key, format!("{s:?} is not an IP address")))
}

/// The local source address the kernel would use to reach `dest`, found by
/// connecting a UDP socket (no packet is sent).
pub fn route_source_towards(dest: SocketAddr) -> std::io::Result<IpAddr> {
    let bind: SocketAddr = if dest.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind)?;
    sock.connect(dest)?;
    Ok(sock.local_addr()?.ip())
}

/// The machine's hostname.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec())
        .ok()
        .filter(|s| !s.is_empty())
}

fn validate_node_name(name: &str) -> Result<(), ConfigError> {
    if crate::gossip::members::valid_name(name) {
        Ok(())
    } else {
        Err(ConfigError::new(
            "--node-name",
            format!("{name:?} must be 1-63 characters of letters, digits, '-', '_' or '.'"),
        ))
    }
}

impl AgentConfig {
    /// Merges flags over the file (if any) and validates the result.
    pub fn resolve(flags: &AgentFlags) -> Result<AgentConfig, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(flags, file)
    }

    /// Merges flags over an already-parsed file and validates the result.
    pub fn merge(flags: &AgentFlags, file: FileConfig) -> Result<AgentConfig, ConfigError> {
        let seed_key = source("--seed", "seeds", !flags.seeds.is_empty());
        let seed_texts = if flags.seeds.is_empty() {
            file.seeds.unwrap_or_default()
        } else {
            flags.seeds.clone()
        };
        let seeds = seed_texts
            .iter()
            .map(|s| parse_seed_as(&seed_key, s))
            .collect::<Result<Vec<_>, _>>()?;

        let listen_key = source("--listen", "listen", flags.listen.is_some());
        let listen = match flags.listen.as_deref().or(file.listen.as_deref()) {
            Some(s) => parse_listen(&listen_key, s)?,
            None => SocketAddr::from(([0, 0, 0, 0], DEFAULT_GOSSIP_PORT)),
        };
        if listen.port() == 0 {
            return Err(ConfigError::new(
                listen_key,
                "port 0 is not allowed: peers need a fixed port",
            ));
        }

        let advertise_key = source("--advertise", "advertise", flags.advertise.is_some());
        let advertise = match flags.advertise.as_deref().or(file.advertise.as_deref()) {
            Some(s) => parse_advertise(&advertise_key, s, listen.port())?,
            None if !listen.ip().is_unspecified() => listen,
            None => match seeds.first() {
                Some(seed) => {
                    let ip = route_source_towards(*seed).map_err(|e| {
                        ConfigError::new(
                            "--advertise",
                            format!("not given and no route towards seed {seed}: {e}"),
                        )
                    })?;
                    SocketAddr::new(ip, listen.port())
                }
                None => {
                    return Err(ConfigError::new(
                        "--advertise",
                        "required when there is no --seed and --listen is a wildcard address",
                    ))
                }
            },
        };
        if advertise.ip().is_unspecified() || advertise.ip().is_multicast() || advertise.port() == 0
        {
            return Err(ConfigError::new(
                advertise_key,
                format!("{advertise} is not a reachable address"),
            ));
        }

        let secret_files = if !flags.secret_files.is_empty() {
            flags.secret_files.clone()
        } else {
            file.secret_files
                .unwrap_or_else(|| vec![PathBuf::from(DEFAULT_SECRET_FILE)])
        };
        if secret_files.is_empty() {
            return Err(ConfigError::new(
                "--secret-file",
                "at least one cluster secret is required",
            ));
        }

        let name_key = source("--node-name", "node_name", flags.node_name.is_some());
        let node_name = match flags.node_name.clone().or(file.node_name) {
            Some(n) => n,
            None => hostname().ok_or_else(|| {
                ConfigError::new("--node-name", "not given and the hostname is unreadable")
            })?,
        };
        validate_node_name(&node_name).map_err(|e| ConfigError::new(name_key, e.reason))?;

        let data_key = source(
            "--data-address",
            "data_addresses",
            !flags.data_addresses.is_empty(),
        );
        let data_texts = if flags.data_addresses.is_empty() {
            file.data_addresses.unwrap_or_default()
        } else {
            flags.data_addresses.clone()
        };
        let mut data_addresses = data_texts
            .iter()
            .map(|s| parse_ip(&data_key, s))
            .collect::<Result<Vec<_>, _>>()?;
        if data_addresses.is_empty() {
            data_addresses.push(advertise.ip());
        }
        if let Some(bad) = data_addresses
            .iter()
            .find(|a| a.is_unspecified() || a.is_multicast())
        {
            return Err(ConfigError::new(
                data_key,
                format!("{bad} is not a unicast address"),
            ));
        }

        let gossip_interval = match file.gossip_interval_secs {
            Some(s) if !(0.05..=10.0).contains(&s) => {
                return Err(ConfigError::new(
                    "config key \"gossip_interval_secs\"",
                    "must be between 0.05 and 10",
                ))
            }
            Some(s) => Duration::from_secs_f64(s),
            None => Duration::from_millis(500),
        };
        const MAX_GRACE: u64 = 30 * 24 * 3600;
        let dead_key = source(
            "--dead-node-grace-secs",
            "dead_node_grace_secs",
            flags.dead_node_grace_secs.is_some(),
        );
        let dead_secs = flags
            .dead_node_grace_secs
            .or(file.dead_node_grace_secs)
            .unwrap_or(DEFAULT_DEAD_NODE_GRACE_SECS);
        if !(10..=MAX_GRACE).contains(&dead_secs) {
            return Err(ConfigError::new(
                dead_key,
                format!("must be between 10 and {MAX_GRACE} (30 days)"),
            ));
        }
        let dead_node_grace = Duration::from_secs(dead_secs);
        let peer_key = source(
            "--peer-grace-secs",
            "peer_grace_secs",
            flags.peer_grace_secs.is_some(),
        );
        let peer_secs = flags.peer_grace_secs.or(file.peer_grace_secs).unwrap_or(60);
        if peer_secs > dead_secs {
            return Err(ConfigError::new(
                peer_key,
                format!("{peer_secs} exceeds the dead-node grace ({dead_secs} s): a peer would be forgotten while its SAs are kept"),
            ));
        }

        let interval_key = source(
            "--rekey-interval-secs",
            "rekey_interval_secs",
            flags.rekey_interval_secs.is_some(),
        );
        let interval = flags
            .rekey_interval_secs
            .or(file.rekey_interval_secs)
            .unwrap_or(3600);
        // Time-based re-keys must come well before the SAs' own soft (23 h)
        // and hard (24 h) limits.
        if !(10..=12 * 3600).contains(&interval) {
            return Err(ConfigError::new(
                interval_key,
                "must be between 10 and 43200 (12 hours)",
            ));
        }
        let bytes_key = source(
            "--rekey-after-bytes",
            "rekey_after_bytes",
            flags.rekey_after_bytes.is_some(),
        );
        let after_bytes = flags.rekey_after_bytes.or(file.rekey_after_bytes);
        if after_bytes.is_some_and(|b| b < 1 << 20) {
            return Err(ConfigError::new(
                bytes_key,
                "must be at least 1048576 (1 MiB); leave it unset for no byte limit",
            ));
        }
        let packets_key = source(
            "--rekey-after-packets",
            "rekey_after_packets",
            flags.rekey_after_packets.is_some(),
        );
        let after_packets = flags.rekey_after_packets.or(file.rekey_after_packets);
        if after_packets.is_some_and(|p| p < 1000) {
            return Err(ConfigError::new(
                packets_key,
                "must be at least 1000; leave it unset for no packet limit",
            ));
        }
        let rekey = RekeyPolicy {
            interval: Duration::from_secs(interval),
            after_bytes,
            after_packets,
        };

        let handshake_port = flags
            .handshake_port
            .or(file.handshake_port)
            .unwrap_or(DEFAULT_HANDSHAKE_PORT);
        if handshake_port == 0 {
            return Err(ConfigError::new(
                source(
                    "--handshake-port",
                    "handshake_port",
                    flags.handshake_port.is_some(),
                ),
                "port 0 is not allowed",
            ));
        }

        let metrics_key = source(
            "--metrics-listen",
            "metrics_listen",
            flags.metrics_listen.is_some(),
        );
        let metrics_listen = match flags
            .metrics_listen
            .as_deref()
            .or(file.metrics_listen.as_deref())
        {
            Some(s) => {
                let addr = parse_listen(&metrics_key, s)?;
                if addr.port() == 0 {
                    return Err(ConfigError::new(
                        metrics_key,
                        "port 0 is not allowed: Prometheus needs a fixed port",
                    ));
                }
                Some(addr)
            }
            None => None,
        };

        let protect_from_flags = !flags.protect.is_empty();
        let protect = if protect_from_flags {
            parse_protect("--protect", &flags.protect)?
        } else {
            parse_protect(
                "config key \"protect\"",
                file.protect.as_deref().unwrap_or_default(),
            )?
        };
        protect_fits_listen(
            if protect_from_flags {
                "--protect"
            } else {
                "config key \"protect\""
            },
            &protect,
            listen,
        )?;
        let ca_files = if !flags.ca.is_empty() {
            flags.ca.clone()
        } else {
            file.ca.unwrap_or_default()
        };
        let cert_file = flags.cert.clone().or(file.cert);
        if !ca_files.is_empty() && cert_file.is_none() {
            return Err(ConfigError::new(
                source("--cert", "cert", flags.cert.is_some() || !flags.ca.is_empty()),
                "required with a CA (--ca): without a certificate every host refuses this node's record",
            ));
        }
        let blocklist_file = flags.blocklist.clone().or(file.blocklist);

        Ok(AgentConfig {
            protect,
            protect_from_flags,
            config_file: flags.config.clone(),
            seeds,
            listen,
            advertise,
            secret_files,
            state_dir: flags
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            node_name,
            control_socket: flags
                .control_socket
                .clone()
                .or(file.control_socket)
                .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
            log_format: flags
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            handshake_port,
            data_addresses,
            gossip_interval,
            dead_node_grace,
            datapath: flags
                .datapath
                .or(file.datapath)
                .unwrap_or(DatapathKind::Kernel),
            esp_algorithm: flags
                .esp_algorithm
                .or(file.esp_algorithm)
                .unwrap_or(Aead::Aes128Gcm),
            peer_grace: Duration::from_secs(peer_secs),
            leave_on_stop: flags.leave_on_stop || file.leave_on_stop.unwrap_or(false),
            rekey,
            metrics_listen,
            ca_files,
            cert_file,
            blocklist_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> AgentFlags {
        AgentFlags {
            node_name: Some("n1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn first_node_needs_an_advertise_address() {
        let err = AgentConfig::merge(&flags(), FileConfig::default()).unwrap_err();
        assert_eq!(err.key, "--advertise");
        let mut f = flags();
        f.listen = Some("192.0.2.1:7000".into());
        let cfg = AgentConfig::merge(&f, FileConfig::default()).unwrap();
        assert_eq!(cfg.advertise, "192.0.2.1:7000".parse().unwrap());
        assert_eq!(
            cfg.data_addresses,
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(cfg.handshake_port, DEFAULT_HANDSHAKE_PORT);
    }

    #[test]
    fn advertise_without_port_takes_the_listen_port() {
        let mut f = flags();
        f.listen = Some("[::]:7001".into());
        f.advertise = Some("2001:db8::1".into());
        let cfg = AgentConfig::merge(&f, FileConfig::default()).unwrap();
        assert_eq!(cfg.advertise, "[2001:db8::1]:7001".parse().unwrap());
    }

    #[test]
    fn advertise_is_derived_from_the_route_towards_the_seed() {
        let mut f = flags();
        f.seeds = vec!["127.0.0.1:9340".into()];
        let cfg = AgentConfig::merge(&f, FileConfig::default()).unwrap();
        assert_eq!(cfg.advertise.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn malformed_seeds_name_the_flag() {
        for bad in [
            "192.0.2.1",
            "192.0.2.1:notaport",
            "192.0.2.1:0",
            "2001:db8::1:9340",
            ":9340",
        ] {
            let err = parse_seed(bad).unwrap_err();
            assert_eq!(err.key, "--seed", "{bad}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert_eq!(
            parse_seed("[2001:db8::1]:9340").unwrap(),
            "[2001:db8::1]:9340".parse().unwrap()
        );
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = parse_file(
            "listen = \"192.0.2.1:7000\"\nnode_name = \"from-file\"\nhandshake_port = 7777\nlog_format = \"json\"\n",
        )
        .unwrap();
        let f = AgentFlags {
            listen: Some("192.0.2.2:7000".into()),
            ..Default::default()
        };
        let cfg = AgentConfig::merge(&f, file).unwrap();
        assert_eq!(cfg.listen, "192.0.2.2:7000".parse().unwrap());
        assert_eq!(cfg.node_name, "from-file");
        assert_eq!(cfg.handshake_port, 7777);
        assert_eq!(cfg.log_format, LogFormat::Json);
    }

    #[test]
    fn dead_generations_leave_the_digest_within_five_minutes_by_default() {
        let mut f = flags();
        f.listen = Some("192.0.2.1:7000".into());
        let cfg = AgentConfig::merge(&f, FileConfig::default()).unwrap();
        // chitchat leaves a dead node out of its digest after half this (docs/scale.md).
        assert_eq!(cfg.dead_node_grace, Duration::from_secs(600));
        let file = parse_file("dead_node_grace_secs = 3600").unwrap();
        let cfg = AgentConfig::merge(&f, file).unwrap();
        assert_eq!(cfg.dead_node_grace, Duration::from_secs(3600));
    }

    #[test]
    fn metrics_listen_is_off_by_default_and_checked() {
        let mut f = flags();
        f.listen = Some("192.0.2.1:7000".into());
        let cfg = AgentConfig::merge(&f, FileConfig::default()).unwrap();
        assert_eq!(cfg.metrics_listen, None);
        let file = parse_file("metrics_listen = \"[::1]:9342\"").unwrap();
        let cfg = AgentConfig::merge(&f, file).unwrap();
        assert_eq!(cfg.metrics_listen, Some("[::1]:9342".parse().unwrap()));
        // The flag wins over the file.
        let mut g = f.clone();
        g.metrics_listen = Some("127.0.0.1:9100".into());
        let file = parse_file("metrics_listen = \"[::1]:9342\"").unwrap();
        let cfg = AgentConfig::merge(&g, file).unwrap();
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        for bad in [
            "9342",
            "localhost:9342",
            "127.0.0.1:0",
            "::1:9342",
            "127.0.0.1:99999",
        ] {
            let mut b = f.clone();
            b.metrics_listen = Some(bad.into());
            let e = AgentConfig::merge(&b, FileConfig::default()).unwrap_err();
            assert_eq!(e.key, "--metrics-listen", "{bad}: {e}");
            assert!(!e.to_string().contains('\n'), "{e}");
            let file = parse_file(&format!("metrics_listen = {bad:?}")).unwrap();
            let e = AgentConfig::merge(&f, file).unwrap_err();
            assert_eq!(e.key, "config key \"metrics_listen\"", "{bad}: {e}");
        }
        let e = parse_file("metrics_listen = 9342").unwrap_err();
        assert_eq!(e.key, "config key \"metrics_listen\"", "{e}");
    }

    #[test]
    fn unknown_config_key_is_named() {
        let err = parse_file("listen = \"192.0.2.1:7000\"\nlisten_adress = \"x\"\n").unwrap_err();
        assert_eq!(err.key, "config key \"listen_adress\"");
        assert!(err.reason.contains("line 2"), "{err}");
    }

    #[test]
    fn wrong_types_and_bad_values_are_rejected() {
        let e = parse_file("listen = \"192.0.2.1:1\"\nhandshake_port = \"x\"").unwrap_err();
        assert_eq!(e.key, "config key \"handshake_port\"", "{e}");
        let file = parse_file("gossip_interval_secs = 0.0").unwrap();
        let mut f = flags();
        f.listen = Some("192.0.2.1:7000".into());
        let err = AgentConfig::merge(&f, file).unwrap_err();
        assert!(err.key.contains("gossip_interval_secs"));
        let mut f2 = flags();
        f2.listen = Some("192.0.2.1".into());
        assert_eq!(
            AgentConfig::merge(&f2, FileConfig::default())
                .unwrap_err()
                .key,
            "--listen"
        );
        let mut f3 = flags();
        f3.listen = Some("192.0.2.1:7000".into());
        f3.node_name = Some("bad name".into());
        assert_eq!(
            AgentConfig::merge(&f3, FileConfig::default())
                .unwrap_err()
                .key,
            "--node-name"
        );
        let mut f4 = flags();
        f4.listen = Some("192.0.2.1:7000".into());
        f4.data_addresses = vec!["nope".into()];
        assert_eq!(
            AgentConfig::merge(&f4, FileConfig::default())
                .unwrap_err()
                .key,
            "--data-address"
        );
    }

    #[test]
    fn ca_cert_and_blocklist_come_from_flags_or_the_file() {
        let mut f = flags();
        f.listen = Some("192.0.2.1:7000".into());
        let cfg = AgentConfig::merge(&f, FileConfig::default()).unwrap();
        assert!(cfg.ca_files.is_empty() && cfg.cert_file.is_none() && cfg.blocklist_file.is_none());
        // A CA without a certificate: every host would refuse this node.
        let file = parse_file("ca = [\"/etc/meshsec/ca.crt\"]").unwrap();
        let e = AgentConfig::merge(&f, file).unwrap_err();
        assert_eq!(e.key, "config key \"cert\"", "{e}");
        let mut g = f.clone();
        g.ca = vec!["/a.crt".into()];
        assert_eq!(
            AgentConfig::merge(&g, FileConfig::default())
                .unwrap_err()
                .key,
            "--cert"
        );
        let file =
            parse_file("ca = [\"/c1.crt\", \"/c2.crt\"]\ncert = \"/n.cert\"\nblocklist = \"/b\"")
                .unwrap();
        let cfg = AgentConfig::merge(&f, file).unwrap();
        assert_eq!(
            cfg.ca_files,
            vec![PathBuf::from("/c1.crt"), PathBuf::from("/c2.crt")]
        );
        assert_eq!(cfg.cert_file, Some(PathBuf::from("/n.cert")));
        assert_eq!(cfg.blocklist_file, Some(PathBuf::from("/b")));
        // Flags win over the file.
        g.cert = Some("/flag.cert".into());
        let file = parse_file("cert = \"/n.cert\"").unwrap();
        let cfg = AgentConfig::merge(&g, file).unwrap();
        assert_eq!(cfg.ca_files, vec![PathBuf::from("/a.crt")]);
        assert_eq!(cfg.cert_file, Some(PathBuf::from("/flag.cert")));
        assert!(parse_file("ca = \"/x\"").unwrap_err().key.contains("ca"));
    }

    #[test]
    fn values_from_the_file_are_named_by_their_file_key() {
        let file = parse_file("seeds = [\"192.0.2.1\"]").unwrap();
        let e = AgentConfig::merge(&flags(), file).unwrap_err();
        assert_eq!(e.key, "config key \"seeds\"", "{e}");
        let mut f = flags();
        f.listen = Some("192.0.2.1:7000".into());
        f.peer_grace_secs = Some(7200);
        assert_eq!(
            AgentConfig::merge(&f, FileConfig::default())
                .unwrap_err()
                .key,
            "--peer-grace-secs"
        );
        f.peer_grace_secs = None;
        f.dead_node_grace_secs = Some(u64::MAX);
        assert_eq!(
            AgentConfig::merge(&f, FileConfig::default())
                .unwrap_err()
                .key,
            "--dead-node-grace-secs"
        );
        f.dead_node_grace_secs = None;
        f.data_addresses = vec!["0.0.0.0".into()];
        assert_eq!(
            AgentConfig::merge(&f, FileConfig::default())
                .unwrap_err()
                .key,
            "--data-address"
        );
    }

    #[test]
    fn rekey_limits_are_validated_and_become_sa_lifetimes() {
        let mut f = flags();
        f.listen = Some("192.0.2.1:7000".into());
        let cfg = AgentConfig::merge(&f, FileConfig::default()).unwrap();
        assert_eq!(cfg.rekey, RekeyPolicy::default());
        let l = cfg.rekey.lifetimes();
        assert_eq!(
            (l.soft_packets, l.hard_packets, l.soft_bytes, l.hard_bytes),
            (0, 0, 0, 0),
            "no count limits by default"
        );
        assert_eq!(
            (l.soft_seconds, l.hard_seconds),
            (crate::mesh::SA_SOFT_SECONDS, crate::mesh::SA_HARD_SECONDS)
        );

        f.rekey_after_packets = Some(999);
        let e = AgentConfig::merge(&f, FileConfig::default()).unwrap_err();
        assert_eq!(e.key, "--rekey-after-packets", "{e}");
        f.rekey_after_packets = None;
        let e =
            AgentConfig::merge(&f, parse_file("rekey_after_bytes = 1000").unwrap()).unwrap_err();
        assert_eq!(e.key, "config key \"rekey_after_bytes\"", "{e}");
        f.rekey_interval_secs = Some(5);
        assert_eq!(
            AgentConfig::merge(&f, FileConfig::default())
                .unwrap_err()
                .key,
            "--rekey-interval-secs"
        );

        f.rekey_interval_secs = Some(600);
        let file =
            parse_file("rekey_after_packets = 5000\nrekey_after_bytes = 1073741824").unwrap();
        let cfg = AgentConfig::merge(&f, file).unwrap();
        assert_eq!(cfg.rekey.interval, Duration::from_secs(600));
        let l = cfg.rekey.lifetimes();
        assert_eq!((l.soft_packets, l.hard_packets), (5000, 10000));
        assert_eq!((l.soft_bytes, l.hard_bytes), (1 << 30, 2 << 30));
    }

    #[test]
    fn missing_config_file_is_named() {
        let err = read_file(Path::new("/nonexistent/meshsec.toml")).unwrap_err();
        assert_eq!(err.key, "--config");
        assert!(err.reason.contains("/nonexistent/meshsec.toml"));
    }

    #[test]
    fn protect_ranges_from_flags_or_file_with_one_line_errors() {
        let mut f = flags();
        f.listen = Some("192.0.2.1:7000".into());
        f.protect = vec![
            "10.0.0.0/24".into(),
            "fd00::/64".into(),
            "10.0.0.0/24".into(),
        ];
        let cfg = AgentConfig::merge(&f, FileConfig::default()).unwrap();
        assert_eq!(cfg.protect.len(), 2, "duplicates merge");
        assert!(cfg.protect_from_flags);
        assert_eq!(
            cfg.reload_protect().unwrap(),
            cfg.protect,
            "flags stay on reload"
        );

        f.protect = vec!["10.0.0.1/24".into()];
        let e = AgentConfig::merge(&f, FileConfig::default()).unwrap_err();
        assert_eq!(e.key, "--protect");
        assert!(
            e.reason.contains("host bits") && e.reason.contains("10.0.0.0/24"),
            "{e}"
        );
        f.protect = vec!["::/0".into()];
        let e = AgentConfig::merge(&f, FileConfig::default()).unwrap_err();
        assert!(e.to_string().starts_with("--protect: ::/0 overlaps"), "{e}");
        assert!(!e.to_string().contains('\n'));

        // A dual-stack wildcard cannot be exempted from IPv4 ranges.
        f.listen = Some("[::]:7000".into());
        f.advertise = Some("192.0.2.1".into());
        f.protect = vec!["10.0.0.0/24".into()];
        let e = AgentConfig::merge(&f, FileConfig::default()).unwrap_err();
        assert_eq!(e.key, "--protect");
        assert!(e.reason.contains("dual-stack"), "{e}");
        f.protect = vec!["fd00::/64".into()];
        AgentConfig::merge(&f, FileConfig::default()).expect("IPv6 ranges fit [::]");
        f.listen = Some("192.0.2.1:7000".into());
        f.advertise = None;

        f.protect = vec![];
        let file = parse_file("protect = [\"10.1.0.0/16\", \"banana\"]").unwrap();
        let e = AgentConfig::merge(&f, file).unwrap_err();
        assert_eq!(e.key, "config key \"protect\"");
        assert!(e.reason.contains("banana"), "{e}");

        // A reload reads the file's key again: a removed range goes.
        let dir = std::env::temp_dir().join(format!("meshsec-protect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("meshsec.toml");
        std::fs::write(&path, "protect = [\"10.1.0.0/16\", \"fd01::/64\"]\n").unwrap();
        f.config = Some(path.clone());
        let cfg = AgentConfig::resolve(&f).unwrap();
        assert_eq!(cfg.protect.len(), 2);
        std::fs::write(&path, "protect = [\"10.1.0.0/16\"]\n").unwrap();
        assert_eq!(
            cfg.reload_protect().unwrap(),
            vec!["10.1.0.0/16".parse::<Prefix>().unwrap()]
        );
        std::fs::write(&path, "protect = [\"10.1.0.0/33\"]\n").unwrap();
        assert_eq!(
            cfg.reload_protect().unwrap_err().key,
            "config key \"protect\""
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
