//! Many agents' gossip in one process (meshsec::gossip::sim): cold start, idle traffic, a join
//! and a crash, in virtual time; one table row per cluster size (docs/benchmarks.md).
//!
//! `cargo run --release --example gossip_sim -- --nodes 100,300,1000 [--json]`

use std::time::Duration;

use clap::Parser;
use meshsec::gossip::sim::{memory_estimate, run, SimConfig, SimReport, ViewMode, DATAGRAM_GOAL};

#[derive(Parser)]
#[command(
    about = "In-process gossip simulation: convergence, join, failure detection, idle traffic, datagram sizes"
)]
struct Args {
    /// Cluster sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    nodes: Vec<usize>,
    /// Datagram loss, 0..1.
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// One-way latency, ms.
    #[arg(long, default_value_t = 5)]
    latency_ms: u64,
    /// Extra latency, uniform in [0, jitter], ms.
    #[arg(long, default_value_t = 5)]
    jitter_ms: u64,
    /// Gossip interval, ms (the agent's default: 500).
    #[arg(long, default_value_t = 500)]
    gossip_interval_ms: u64,
    /// How often each node computes its membership view, ms (the agent: 250).
    #[arg(long, default_value_t = 250)]
    view_interval_ms: u64,
    /// Idle measurement window, virtual seconds.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// A phase not reached within this many virtual seconds is reported as not reached.
    #[arg(long, default_value_t = 60)]
    phase_limit_secs: u64,
    /// `agent`: every node verifies every record every round, as the agent does today;
    /// `cached`: node 0 does (its CPU is the view figure), the others reuse verified records
    /// (large clusters fit in the machine; the views are the same).
    #[arg(long, value_enum, default_value = "agent")]
    view: View,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum View {
    Agent,
    Cached,
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn secs(v: Option<f64>, goal: f64) -> String {
    match v {
        Some(s) => format!("{s:.2}{}", if s <= goal { "" } else { " ✗" }),
        None => "not reached ✗".into(),
    }
}

fn row(r: &SimReport) -> String {
    format!(
        "| {} | {} | {} | {} | {:.0}{} | {:.1} | {} / {} / {}{} | {} | {} / {} | {:.2}% + {:.2}% | {:.0} / {:.0} |",
        r.nodes,
        secs(r.converge_secs, 10.0),
        secs(r.join_secs, 3.0),
        secs(r.dead_secs, 10.0),
        r.idle_bytes_per_node_s,
        if r.idle_bytes_per_node_s <= 20_000.0 { "" } else { " ✗" },
        r.idle_datagrams_per_node_s,
        r.idle_p50_bytes,
        r.idle_p99_bytes,
        r.max_datagram_bytes,
        if r.max_datagram_bytes <= DATAGRAM_GOAL { "" } else { " ✗" },
        r.datagrams_over_goal,
        r.pieced_messages,
        r.pieced_lost,
        r.idle_gossip_cpu_per_node * 100.0,
        r.idle_view_cpu_per_node * 100.0,
        r.virtual_secs,
        r.wall_secs,
    )
}

fn main() -> std::process::ExitCode {
    match simulate(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gossip_sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn simulate(args: Args) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&args.loss) {
        anyhow::bail!("--loss: must be at least 0 and below 1");
    }
    // Progress on stderr (phases in virtual time); chitchat's own logs stay quiet.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "meshsec::gossip::sim=info".into()),
        )
        .init();
    let available = available_memory();
    for &n in &args.nodes {
        if n < 2 {
            anyhow::bail!("--nodes: {n}: at least 2 hosts");
        }
        if let Some(avail) = available {
            if memory_estimate(n) > avail {
                anyhow::bail!(
                    "--nodes: {n}: would need about {} GB of memory, {} GB available (chitchat keeps a 8 KB failure-detector window per peer in every simulated node)",
                    memory_estimate(n) >> 30,
                    avail >> 30
                );
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    if !args.json {
        println!("| nodes | converge s (≤10) | join s (≤3) | dead s (≤10) | idle B/s per node (≤20,000) | idle datagrams/s per node | datagram p50 / p99 / max B (≤1,400) | datagrams > 1,400 B | messages in pieces / lost | CPU per node at idle: gossip + view | virtual / wall s |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
    }
    for &n in &args.nodes {
        let cfg = SimConfig {
            nodes: n,
            gossip_interval: Duration::from_millis(args.gossip_interval_ms),
            view_interval: Duration::from_millis(args.view_interval_ms),
            latency: Duration::from_millis(args.latency_ms),
            jitter: Duration::from_millis(args.jitter_ms),
            loss: args.loss,
            idle_window: Duration::from_secs(args.idle_secs),
            phase_limit: Duration::from_secs(args.phase_limit_secs),
            view: match args.view {
                View::Agent => ViewMode::Agent,
                View::Cached => ViewMode::Cached { witness: true },
            },
            ..SimConfig::default()
        };
        let r = rt.block_on(run(cfg))?;
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!("{}", row(&r));
        }
    }
    Ok(())
}
