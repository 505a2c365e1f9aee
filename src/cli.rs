//! The `meshsec` command line. Exit status: 0 success, 1 runtime failure,
//! 2 bad usage, bad configuration or unusable local resources.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{
    AgentConfig, AgentFlags, LogFormat, DEFAULT_CONTROL_SOCKET, DEFAULT_SECRET_FILE,
    DEFAULT_STATE_DIR,
};
use crate::control::MemberRow;
use crate::control::{Client, Reply, Request, Status};
use crate::identity;
use crate::mesh::LinkState;

#[derive(Parser)]
#[command(
    name = "meshsec",
    version,
    about = "Kernel ESP between every pair of hosts, keyed by Noise, found by gossip"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The command line as a clap command, for the man pages and shell
/// completions the package ships (examples/gen_assets.rs).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new cluster secret (32 random bytes, base64, mode 0600).
    Init {
        /// Where to write it; never overwritten.
        #[arg(long, value_name = "FILE", default_value = DEFAULT_SECRET_FILE)]
        out: PathBuf,
    },
    /// Print this node's identity key (the Ed25519 signing key a CA
    /// certificate is issued to: `meshsec ca sign --node-pubkey`), creating
    /// the node's keys if they do not exist yet.
    Pubkey {
        /// State directory holding the node's keys.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print the static X25519 (Noise) public key instead.
        #[arg(long)]
        noise: bool,
        /// Both keys and their fingerprints, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The optional cluster CA: create it, sign host certificates, show one.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Run the agent.
    Agent(Box<AgentFlags>),
    /// List cluster members.
    Members {
        #[command(flatten)]
        client: ClientArgs,
        /// Stream changes until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Describe this node.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Leave the cluster: peers remove their SAs for this host, this host removes its own, the agent exits.
    Leave {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove every SA and policy meshsec installed on this host, and the bindings and blocked pairs it holds (the agent must be stopped).
    Flush {
        /// Control socket of the agent, to make sure it is not running.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
        control_socket: PathBuf,
        /// State directory whose saved bindings and blocked pairs (guard.json) go too.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Re-key every link now (make-before-break: no packet is lost), or only those to one peer.
    Rekey {
        #[command(flatten)]
        client: ClientArgs,
        /// Only the links to this peer (node name).
        #[arg(long, value_name = "NAME")]
        peer: Option<String>,
    },
    /// Re-read the cluster secret files (the agent's --secret-file paths) and
    /// use them from now on, without a restart (SIGHUP does the same).
    Reload {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check this host: kernel support, the agent and its config, secret and
    /// key file modes, and per peer clock offset, gossip and handshake
    /// reachability, ESP arriving, MTU headroom, shadowing IPsec policies.
    /// One line per check (✔ or ✘ with the fix); exit status 1 if any fails.
    Doctor(Box<DoctorArgs>),
    /// Release a peer that will not come back: its addresses stop being bound
    /// to it and its blocked pairs (policies kept so traffic is never sent in
    /// clear) are removed, so traffic to those addresses flows unprotected.
    Forget {
        #[command(flatten)]
        client: ClientArgs,
        /// The peer's node name, or a peer address.
        name: String,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a CA signing key (mode 0600) and, beside it, the CA
    /// certificate `ca.crt` to copy to every host (`--ca`).
    Init {
        /// Where to write the CA key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace an existing CA key.
        #[arg(long)]
        force: bool,
    },
    /// Sign a host's identity key with its name and the address ranges it may publish.
    Sign {
        /// The CA key (`meshsec ca init`).
        #[arg(long, value_name = "FILE")]
        ca_key: PathBuf,
        /// The host's node name.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// An address range the host may publish, ADDR/PREFIX or ADDR (repeatable, 1-16).
        #[arg(long = "addr", value_name = "CIDR", required = true, num_args = 1..)]
        addrs: Vec<String>,
        /// The host's identity key, as `meshsec pubkey` prints it.
        #[arg(long, value_name = "KEY")]
        node_pubkey: String,
        /// Days the certificate is valid from now (1-3650).
        #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u64).range(1..=crate::cert::MAX_VALID_DAYS))]
        valid_for: u64,
        /// Valid from this time (seconds since the epoch; default: an hour
        /// ago, so hosts whose clocks lag the signer's accept a renewal at
        /// once), e.g. to issue a rotation's certificates ahead of time.
        #[arg(long, value_name = "UNIX_SECS")]
        not_before: Option<u64>,
        /// Where to write the certificate.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace an existing file at --out.
        #[arg(long)]
        force: bool,
    },
    /// Print a certificate (and, with --ca, whether it verifies now).
    Show {
        /// The certificate file.
        file: PathBuf,
        /// CA certificate to verify it against (repeatable).
        #[arg(long = "ca", value_name = "FILE")]
        ca: Vec<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct DoctorArgs {
    /// The agent's configuration (same flags as `meshsec agent`; without
    /// --config, /etc/meshsec/meshsec.toml is read if it exists).
    #[command(flatten)]
    agent: AgentFlags,
    /// Machine-readable output: {"ok": bool, "checks": [{name, ok, detail, fix, peer}]}.
    #[arg(long)]
    json: bool,
    /// Seconds between the two samples of link counters (1-60).
    #[arg(long, value_name = "SECS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    sample_secs: u64,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Control socket of the agent to ask.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    control_socket: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Runs the CLI and returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return 0;
        }
        Err(e) => {
            // One line, like every other usage error: clap's first line names the problem.
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid usage")
                .trim_start_matches("error: ");
            eprintln!("meshsec: {first} (see meshsec --help)");
            return 2;
        }
    };
    match cli.cmd {
        Cmd::Init { out } => match identity::init_secret(&out) {
            Ok(()) => {
                eprintln!(
                    "wrote a new cluster secret to {}; copy it to every host (mode 0600)",
                    out.display()
                );
                0
            }
            Err(e) => fail(2, e),
        },
        Cmd::Pubkey {
            state_dir,
            noise,
            json,
        } => pubkey(&state_dir, noise, json),
        Cmd::Ca(cmd) => ca(cmd),
        Cmd::Agent(flags) => run_agent(*flags),
        Cmd::Members { client, watch } => client_cmd(
            client,
            if watch {
                Request::Watch
            } else {
                Request::Members
            },
        ),
        Cmd::Status { client } => client_cmd(client, Request::Status),
        Cmd::Rekey { client, peer } => client_cmd(client, Request::Rekey { peer }),
        Cmd::Leave { client } => client_cmd(client, Request::Leave),
        Cmd::Reload { client } => client_cmd(client, Request::Reload),
        Cmd::Forget { client, name } => client_cmd(client, Request::Forget { name }),
        Cmd::Doctor(args) => doctor(*args),
        Cmd::Flush {
            control_socket,
            state_dir,
            json,
        } => flush(&control_socket, &state_dir, json),
    }
}

/// Prints the node's keys, creating them first if the state directory has
/// none (so a certificate can be issued before the first start).
fn pubkey(state_dir: &std::path::Path, noise: bool, json: bool) -> i32 {
    let keys = (|| {
        let (node, origin) = identity::NodeKey::load_or_generate(state_dir)?;
        if origin == identity::KeyOrigin::Generated {
            node.persist(state_dir)?;
            eprintln!("created the node key in {}", state_dir.display());
        }
        let (signing, origin) = identity::SigningKey::load_or_generate(state_dir)?;
        if origin == identity::KeyOrigin::Generated {
            signing.persist(state_dir)?;
            eprintln!("created the signing key in {}", state_dir.display());
        }
        Ok::<_, identity::IdentityError>((node, signing))
    })();
    let (node, signing) = match keys {
        Ok(k) => k,
        Err(e) => return fail(2, e),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "public_key": identity::encode_public(node.public()),
                "fingerprint": identity::fingerprint(node.public()),
                "signing_key": signing.public().to_string(),
                "signing_fingerprint": signing.public().fingerprint(),
            })
        );
    } else if noise {
        println!("{}", identity::encode_public(node.public()));
    } else {
        println!("{}", signing.public());
    }
    0
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ca(cmd: CaCmd) -> i32 {
    use crate::cert::{self, Certificate, Range};
    match cmd {
        CaCmd::Init { out, force } => match cert::ca_init(&out, force) {
            Ok((crt, public)) => {
                eprintln!(
                    "wrote the CA key to {} (keep it off the hosts) and the CA certificate to {} (key id {}); copy {} to every host (--ca)",
                    out.display(),
                    crt.display(),
                    cert::key_id_text(&cert::key_id(&public)),
                    crt.display()
                );
                0
            }
            Err(e) => fail(2, e),
        },
        CaCmd::Sign {
            ca_key,
            name,
            addrs,
            node_pubkey,
            valid_for,
            not_before,
            out,
            force,
        } => {
            let key = match cert::load_ca_key(&ca_key) {
                Ok(k) => k,
                Err(e) => return fail(2, e),
            };
            if !crate::gossip::members::valid_name(&name) {
                return fail(2, format!("--name: {name:?} is not 1-63 characters of letters, digits, '-', '_' or '.'"));
            }
            let mut ranges = Vec::new();
            for a in &addrs {
                match a.parse::<Range>() {
                    Ok(r) => ranges.push(r),
                    Err(e) => return fail(2, format!("--addr: {e}")),
                }
            }
            if ranges.len() > cert::MAX_RANGES {
                return fail(
                    2,
                    format!(
                        "--addr: {} ranges, at most {}",
                        ranges.len(),
                        cert::MAX_RANGES
                    ),
                );
            }
            let Some(node_key) = identity::decode_public(node_pubkey.trim())
                .filter(|k| ed25519_dalek::VerifyingKey::from_bytes(k).is_ok())
                .map(identity::SigningPublicKey)
            else {
                return fail(2, "--node-pubkey: not an identity key (base64 of 32 bytes, as `meshsec pubkey` prints it)");
            };
            if out.exists() && !force {
                return fail(
                    2,
                    format!(
                        "--out: {} already exists; refusing to overwrite it without --force",
                        out.display()
                    ),
                );
            }
            // Backdated by an hour: a renewal replaces the old certificate at
            // once, and a host whose clock lags would refuse it as not yet
            // valid (review).
            let from = not_before.unwrap_or_else(|| unix_now().saturating_sub(3_600));
            let Some(until) = from.checked_add(valid_for * 86_400) else {
                return fail(2, "--not-before: too far in the future");
            };
            let c = match Certificate::issue(&key, &name, node_key, ranges, from, until) {
                Ok(c) => c,
                Err(e) => return fail(2, e),
            };
            let text = format!(
                "# meshsec certificate {} for {name}, CA {}, valid until {}\n{}\n",
                c.fingerprint(),
                cert::key_id_text(&c.ca_key_id),
                c.not_after,
                c.to_text()
            );
            if let Err(e) = cert::write_atomic(&out, text.as_bytes()) {
                return fail(2, format!("--out: cannot write {}: {e}", out.display()));
            }
            eprintln!(
                "wrote the certificate {} for {name} to {} (valid {valid_for} days); install it on the host (--cert)",
                c.fingerprint(),
                out.display()
            );
            0
        }
        CaCmd::Show { file, ca, json } => {
            let c = match cert::load_cert_file("FILE", &file) {
                Ok(c) => c,
                Err(e) => return fail(2, e),
            };
            let cas = match cert::load_cas(&ca) {
                Ok(c) => c,
                Err(e) => return fail(2, e),
            };
            let now = unix_now();
            let verdict = if cas.is_empty() {
                c.check_time(now)
            } else {
                c.verify(&cas, now)
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "fingerprint": c.fingerprint(),
                        "ca_key_id": cert::key_id_text(&c.ca_key_id),
                        "name": c.name,
                        "node_key": c.node_key.to_string(),
                        "node_fingerprint": c.node_key.fingerprint(),
                        "ranges": c.ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                        "not_before": c.not_before,
                        "not_after": c.not_after,
                        "verified": !cas.is_empty() && verdict.is_ok(),
                        "valid": verdict.is_ok(),
                        "refused": verdict.err().map(|r| r.as_str()),
                    })
                );
            } else {
                println!("certificate:  {}", c.fingerprint());
                println!("name:         {}", c.name);
                println!(
                    "identity key: {} ({})",
                    c.node_key,
                    c.node_key.fingerprint()
                );
                println!(
                    "ranges:       {}",
                    c.ranges
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!("CA key id:    {}", cert::key_id_text(&c.ca_key_id));
                println!("not before:   {} (unix seconds)", c.not_before);
                println!(
                    "not after:    {} (unix seconds, {})",
                    c.not_after,
                    expiry_text(c.not_after, now)
                );
                match verdict {
                    Ok(()) if cas.is_empty() => println!(
                        "state:        within its validity (signature not checked: no --ca)"
                    ),
                    Ok(()) => println!("state:        valid"),
                    Err(r) => println!("state:        refused: {r}"),
                }
            }
            0
        }
    }
}

/// "expires in 12 days" / "expired 3 days ago".
pub(crate) fn expiry_text(not_after: u64, now: u64) -> String {
    if now >= not_after {
        format!("expired {} ago", duration_words(now - not_after))
    } else {
        format!("expires in {}", duration_words(not_after - now))
    }
}

fn duration_words(secs: u64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s if s >= 120 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    }
}

fn fail(code: i32, e: impl std::fmt::Display) -> i32 {
    eprintln!("meshsec: {e}");
    code
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,chitchat=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run_agent(flags: AgentFlags) -> i32 {
    let cfg = match AgentConfig::resolve(&flags) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    init_logging(cfg.log_format);
    let rt = runtime();
    let result = rt.block_on(crate::agent::run(cfg, shutdown_signal()));
    match result {
        Ok(()) => 0,
        Err(e @ crate::agent::AgentError::Start(_)) => fail(2, e),
        Err(e) => fail(1, e),
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn client_cmd(args: ClientArgs, req: Request) -> i32 {
    let rt = runtime();
    rt.block_on(async {
        let mut client = match Client::request(&args.control_socket, &req).await {
            Ok(c) => c,
            Err(e) => return fail(1, e),
        };
        loop {
            let reply = tokio::select! {
                r = client.next() => r,
                _ = tokio::signal::ctrl_c() => return 0,
            };
            match reply {
                Ok(Some(r)) => print_reply(&r, args.json),
                Ok(None) => return if req == Request::Watch { 1 } else { 0 },
                Err(e) => return fail(1, e),
            }
            if req != Request::Watch {
                return 0;
            }
        }
    })
}

fn doctor(args: DoctorArgs) -> i32 {
    let report = runtime().block_on(crate::doctor::gather::run(crate::doctor::gather::Options {
        flags: args.agent,
        sample: std::time::Duration::from_secs(args.sample_secs),
    }));
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        print!("{}", report.render());
    }
    if report.ok {
        0
    } else {
        1
    }
}

fn flush(control_socket: &std::path::Path, state_dir: &std::path::Path, json: bool) -> i32 {
    use crate::datapath::Datapath;
    if std::os::unix::net::UnixStream::connect(control_socket).is_ok() {
        return fail(
            2,
            format!("--control-socket: an agent is running at {}; it would re-install what flush removes (use `meshsec leave`)", control_socket.display()),
        );
    }
    let mut dp = match crate::datapath::XfrmDatapath::open() {
        Ok(d) => d,
        Err(e) => return fail(1, e),
    };
    let r = match dp.flush_owned() {
        Ok(r) => r,
        Err(e) => return fail(1, e),
    };
    // What fail closed held goes with the policies that enforced it.
    let guard = state_dir.join(crate::mesh::GUARD_FILE);
    let guard_removed = match std::fs::remove_file(&guard) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return fail(
                1,
                format!("--state-dir: cannot remove {}: {e}", guard.display()),
            )
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"sas": r.sas, "policies": r.policies, "guard_removed": guard_removed})
        );
    } else {
        println!(
            "removed {} SAs and {} policies owned by meshsec{}",
            r.sas,
            r.policies,
            if guard_removed {
                ", and the saved bindings and blocked pairs"
            } else {
                ""
            }
        );
    }
    0
}

fn print_reply(reply: &Reply, json: bool) {
    if json {
        // Stable machine formats: the listing is a JSON array, status an
        // object, each watch event one object per line.
        let v = match reply {
            Reply::Members(m) => serde_json::to_string(m),
            Reply::Status(s) => serde_json::to_string(s),
            Reply::Rekeying(n) => serde_json::to_string(&serde_json::json!({ "rekeying": n })),
            Reply::Forgot(n) => serde_json::to_string(&serde_json::json!({ "forgotten": n })),
            Reply::Leaving => serde_json::to_string(&serde_json::json!({ "leaving": true })),
            Reply::Reloaded(r) => serde_json::to_string(r),
            other => serde_json::to_string(other),
        };
        println!("{}", v.unwrap_or_default());
        return;
    }
    match reply {
        Reply::Members(m) => print!("{}", render_members(m)),
        Reply::Status(s) => print!("{}", render_status(s)),
        Reply::Changes { changes, .. } => {
            for c in changes {
                let restart = if c.restarted { " (restarted)" } else { "" };
                let (from, to) = (c.from_text(), c.to_text());
                println!("{}  {}: {} -> {}{}", now_text(), c.name, from, to, restart);
            }
        }
        Reply::Rekeying(n) => println!("re-keying {n} link(s)"),
        Reply::Forgot(n) => println!("released {n} binding(s) and blocked pair(s)"),
        Reply::Leaving => {
            println!("leaving the cluster; the agent removes its SAs and policies and exits")
        }
        Reply::Reloaded(r) => println!(
            "reloaded: keyring {} secret(s), gossip key ids {} (the first seals); {} CA key(s), {} blocklisted, certificate {}; protected ranges: {}",
            r.secrets,
            r.key_ids.join(", "),
            r.cas,
            r.blocklisted,
            r.cert.as_deref().unwrap_or("none"),
            if r.protect.is_empty() {
                "-".to_string()
            } else {
                r.protect.join(", ")
            }
        ),
        Reply::Error(e) => eprintln!("agent: {e}"),
    }
}

fn now_text() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

fn heard_text(ms: u64) -> String {
    match ms {
        0..=999 => "now".into(),
        1000..=59_999 => format!("{}s ago", ms / 1000),
        60_000..=3_599_999 => format!("{}m ago", ms / 60_000),
        _ => format!("{}h ago", ms / 3_600_000),
    }
}

/// Aligns rows of cells into columns separated by two spaces.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.len());
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(|s| s.as_str()).collect()));
    }
    out
}

fn sa_summary(m: &MemberRow) -> String {
    if m.is_self {
        return "-".into();
    }
    if m.links.is_empty() {
        return "none".into();
    }
    let est = m
        .links
        .iter()
        .filter(|l| l.sa == LinkState::Established)
        .count();
    if est == m.links.len() {
        format!("established ({est})")
    } else if m.links.iter().any(|l| l.sa == LinkState::Handshaking) {
        format!("handshaking ({est}/{})", m.links.len())
    } else {
        format!("none ({est}/{})", m.links.len())
    }
}

/// Renders the listing: one aligned row per node, then one row per
/// encrypted link with its SPIs and kernel counters.
pub fn render_members(members: &[MemberRow]) -> String {
    let rows: Vec<[String; 8]> = members
        .iter()
        .map(|m| {
            [
                if m.is_self {
                    format!("{}*", m.name)
                } else {
                    m.name.clone()
                },
                m.gossip_addr.to_string(),
                if m.data_addrs.is_empty() {
                    "-".into()
                } else {
                    m.data_addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                },
                m.state.to_string(),
                m.fingerprint.clone().unwrap_or_else(|| "-".into()),
                m.generation.to_string(),
                heard_text(m.last_heard_ms),
                sa_summary(m),
            ]
        })
        .collect();
    let mut out = table(
        [
            "NAME",
            "GOSSIP",
            "DATA",
            "STATE",
            "FINGERPRINT",
            "GENERATION",
            "LAST HEARD",
            "SA",
        ],
        &rows,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let links: Vec<[String; 10]> = members
        .iter()
        .flat_map(|m| m.links.iter().map(move |l| (m, l)))
        .map(|(m, l)| {
            [
                m.name.clone(),
                format!("{} -> {}", l.local, l.remote),
                format!("{:?}", l.sa).to_lowercase(),
                l.spi_in.clone().unwrap_or_else(|| "-".into()),
                l.spi_out.clone().unwrap_or_else(|| "-".into()),
                l.aead.clone().unwrap_or_else(|| "-".into()),
                l.established_at
                    .map(|t| heard_text(now.saturating_sub(t) * 1000).replace(" ago", ""))
                    .unwrap_or_else(|| "-".into()),
                format!("{}/{}", l.bytes_in, l.bytes_out),
                format!("{}/{}", l.packets_in, l.packets_out),
                format!("{}/{}", l.replay_drops, l.integrity_failures),
            ]
        })
        .collect();
    for m in members {
        if let Some(c) = &m.identity_conflict {
            out.push_str(&format!(
                "identity conflict: {}: {c}; the refused identity gets nothing (meshsec forget {} accepts it)\n",
                m.name, m.name
            ));
        }
        if let Some(r) = &m.refused {
            out.push_str(&format!(
                "refused: {}: {r} (cluster CA or blocklist); it gets no links\n",
                m.name
            ));
        }
    }
    if !links.is_empty() {
        out.push('\n');
        out.push_str(&table(
            [
                "PEER",
                "LINK",
                "SA",
                "SPI IN",
                "SPI OUT",
                "AEAD",
                "SINCE",
                "BYTES IN/OUT",
                "PKTS IN/OUT",
                "REPLAY/INTEGRITY",
            ],
            &links,
        ));
    }
    out
}

/// The non-zero integer fields of a counters snapshot as `name=value`,
/// sorted by name (`-` when all are zero).
fn kv<T: serde::Serialize>(counters: &T) -> String {
    let mut nonzero: Vec<String> = match serde_json::to_value(counters) {
        Ok(serde_json::Value::Object(m)) => m
            .into_iter()
            .filter_map(|(k, v)| v.as_u64().filter(|n| *n != 0).map(|n| format!("{k}={n}")))
            .collect(),
        _ => Vec::new(),
    };
    nonzero.sort();
    if nonzero.is_empty() {
        "-".into()
    } else {
        nonzero.join(" ")
    }
}

fn render_status(s: &Status) -> String {
    format!(
        "name:         {}\nversion:      {}\npublic key:   {}\nfingerprint:  {}\nsigning key:  {}\ngeneration:   {}\ngossip:       listen {} advertise {}\ndata addrs:   {}\nhandshake:    udp/{}\nprotocol:     {}\nuptime:       {}s\nmembers:      {} alive, {} suspect, {} dead, {} left, {} refused (bad name)\ndatapath:     {} ({})\nesp offload:  {}\ngossip stats: {}\nrecords:      {}\nhandshakes:   {}\nmesh:         {}\n",
        s.name,
        s.version,
        s.public_key,
        s.fingerprint,
        s.signing_fingerprint,
        s.generation,
        s.gossip_listen,
        s.gossip_advertise,
        s.data_addrs.join(","),
        s.handshake_port,
        s.protocol,
        s.uptime_secs,
        s.members.alive,
        s.members.suspect,
        s.members.dead,
        s.members.left,
        s.members.refused,
        s.datapath,
        s.esp_algorithm,
        render_offload(&s.esp_offload),
        kv(&s.gossip),
        kv(&s.records),
        kv(&s.handshake),
        kv(&s.mesh),
    ) + &render_protect(&s.protect)
        + &render_blocked(&s.blocked)
        + &render_conflicts(&s.conflicts)
        + &render_identity_conflicts(&s.identity_conflicts)
        + &render_trust(s)
}

/// The certificate line, the CAs, the blocklist and the trust refusals.
fn render_trust(s: &Status) -> String {
    let now = unix_now();
    let mut out = match &s.cert {
        Some(c) => format!(
            "certificate:  {} from CA {}, ranges {}, valid until {} ({}){}\n",
            c.info.fingerprint,
            c.info.ca_key_id,
            c.info.ranges.join(","),
            c.info.not_after,
            expiry_text(c.info.not_after, now),
            if c.expiring {
                ": renew it (meshsec ca sign, then meshsec reload)"
            } else {
                ""
            }
        ),
        None => "certificate:  none\n".into(),
    };
    out.push_str(&format!(
        "trust:        {}, {} blocklisted fingerprint(s)\n",
        if s.cas.is_empty() {
            "no CA (certificates not required)".to_string()
        } else {
            format!("CA {}", s.cas.join(", "))
        },
        s.blocklisted
    ));
    let totals: Vec<String> = s
        .trust_refusals
        .totals
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    out.push_str(&format!(
        "refused:      {} record(s) now; so far: {}\n",
        s.trust_refusals.current.len(),
        if totals.is_empty() {
            "none".to_string()
        } else {
            totals.join(" ")
        }
    ));
    for r in &s.trust_refusals.current {
        out.push_str(&format!(
            "              {} (generation {}, signing key {}): {}\n",
            r.name, r.generation, r.signing_fingerprint, r.reason
        ));
    }
    out
}

/// ESP GSO offload per family, e.g. `v4 loaded, v6 absent: ESP without GSO`
/// (`-` for the in-memory datapath).
fn render_offload(
    m: &std::collections::BTreeMap<String, crate::datapath::offload::OffloadState>,
) -> String {
    if m.is_empty() {
        return "-".into();
    }
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let mut out = parts.join(", ");
    if m.values().any(|v| !v.active()) {
        out.push_str(
            " (fix: modprobe esp4_offload esp6_offload, then meshsec rekey: only SAs created after the load use it)",
        );
    }
    out
}

/// One line per record refused for its identity (impersonation).
fn render_identity_conflicts(c: &crate::gossip::pins::Conflicts) -> String {
    let mut out = format!("identities:   {} record(s) refused so far\n", c.total);
    for f in &c.current {
        out.push_str(&format!(
            "              {} (generation {}): pinned {}, refused {}\n",
            f.name, f.generation, f.pinned, f.offered
        ));
    }
    out
}

/// One line per refused claim on a bound address.
fn render_conflicts(rows: &[crate::mesh::Conflict]) -> String {
    let mut out = String::new();
    for c in rows {
        out.push_str(&format!(
            "conflict:     {} claims {}, bound to {}: ignored\n",
            c.claimant, c.address, c.bound_to
        ));
    }
    out
}

/// Strict mode: the protected ranges and the policies that hold them.
fn render_protect(p: &crate::control::ProtectStatus) -> String {
    if p.ranges.is_empty() {
        return format!(
            "protect:      -{}\n",
            if p.policies > 0 {
                format!(" ({} range policies still in the kernel)", p.policies)
            } else {
                String::new()
            }
        );
    }
    format!(
        "protect:      {} (never clear; {} range policies in the kernel)\n",
        p.ranges.join(", "),
        p.policies
    )
}

/// One line per blocked pair: traffic to it is dropped, never sent in clear.
fn render_blocked(rows: &[crate::control::BlockedRow]) -> String {
    if rows.is_empty() {
        return "blocked:      -\n".into();
    }
    let mut out = String::from("blocked:      traffic dropped (never clear) until the peer is back, leaves, or `meshsec forget`:\n");
    for b in rows {
        out.push_str(&format!(
            "              {} -> {} ({}{}): {}, {}s\n",
            b.local,
            b.remote,
            b.peer.as_deref().unwrap_or("unknown peer"),
            b.fingerprint
                .as_deref()
                .map(|f| format!(" {f}"))
                .unwrap_or_default(),
            b.reason,
            b.since_secs
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::members::MemberState;

    #[test]
    fn offload_line_names_each_family_and_the_fix_when_absent() {
        use crate::datapath::offload::OffloadState;
        let m = |v: &[(&str, OffloadState)]| -> std::collections::BTreeMap<String, OffloadState> {
            v.iter().map(|(k, s)| (k.to_string(), *s)).collect()
        };
        assert_eq!(render_offload(&m(&[])), "-");
        let ok = render_offload(&m(&[
            ("v4", OffloadState::Loaded),
            ("v6", OffloadState::Autoloaded),
        ]));
        assert!(
            ok.starts_with("v4 loaded, v6 loaded (kernel autoload"),
            "{ok}"
        );
        assert!(!ok.contains("fix"), "{ok}");
        let bad = render_offload(&m(&[("v4", OffloadState::Absent)]));
        assert!(bad.starts_with("v4 absent: ESP without GSO"), "{bad}");
        assert!(bad.contains("modprobe esp4_offload esp6_offload"), "{bad}");
    }

    #[test]
    fn members_table_is_aligned() {
        let m = |name: &str, state| MemberRow {
            name: name.into(),
            gossip_addr: "192.0.2.11:9340".parse().unwrap(),
            data_addrs: vec!["192.0.2.11".parse().unwrap()],
            state,
            fingerprint: Some("abcd:ef01:2345:6789".into()),
            public_key: None,
            generation: 17,
            handshake_port: Some(9341),
            protocol: Some(1),
            last_heard_ms: 2500,
            is_self: false,
            links: vec![],
            identity_conflict: None,
            refused: None,
            cert_not_after: None,
        };
        let out = render_members(&[
            m("a", MemberState::Alive),
            m("longer-name", MemberState::Dead),
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = lines[0].find("GOSSIP").unwrap();
        assert_eq!(lines[1].find("192.0.2.11:9340"), Some(col));
        assert_eq!(lines[2].find("192.0.2.11:9340"), Some(col));
        assert!(lines[2].contains("dead") && lines[2].contains("2s ago"));
    }
}
