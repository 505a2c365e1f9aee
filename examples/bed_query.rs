//! The test bed's typed view of an agent (testnet/lib/bed.sh, `bedq`): asks
//! the agent's control socket through the library's own client and reply
//! types and prints one plain value, so a change to the control API's shape
//! breaks this build instead of a scenario inside the VM.
//!
//! `bed_query --control-socket PATH QUERY [ARG...]`, QUERY one of:
//!
//! - `status KEY...`: one value of the status, by field path, e.g.
//!   `status uptime_secs`, `status mesh rekeys_started`, `status members alive`,
//!   `status esp_offload v4`
//! - `established-links`: how many links of the listing are established
//! - `count [STATE]`: how many members the listing has (in STATE)
//! - `listed NAME`: how many members named NAME the listing has
//! - `state NAME`: NAME's state, or `absent`
//! - `member-field NAME FIELD`: one field of NAME's row (an absent optional
//!   value prints as an empty line); NAME not listed is an error
//! - `states`: `COUNT name:state,...` for the whole listing
//!
//! Errors: one line on stderr naming what failed, exit status 1.

use std::path::{Path, PathBuf};

use meshsec::control::{Client, LinkRow, MemberRow, Reply, Request, Status};
use meshsec::gossip::members::MemberState;
use meshsec::mesh::LinkState;

const USAGE: &str = "usage: bed_query --control-socket PATH \
    (status KEY... | established-links | count [STATE] | listed NAME | state NAME \
    | member-field NAME FIELD | states)";

fn main() {
    match run(std::env::args().skip(1).collect()) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("bed_query: {e}");
            std::process::exit(1);
        }
    }
}

fn run(args: Vec<String>) -> Result<String, String> {
    let (socket, query) = match args.as_slice() {
        [flag, socket, query @ ..] if flag == "--control-socket" && !query.is_empty() => {
            (PathBuf::from(socket), query)
        }
        _ => return Err(USAGE.into()),
    };
    let words: Vec<&str> = query.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["status", keys @ ..] if !keys.is_empty() => status_value(&status(&socket)?, keys),
        ["established-links"] => Ok(established(&members(&socket)?).to_string()),
        ["count"] => Ok(members(&socket)?.len().to_string()),
        ["count", state] => {
            let state: MemberState = serde_json::from_value(state.to_string().into())
                .map_err(|_| format!("count: no member state {state}"))?;
            let n = members(&socket)?
                .iter()
                .filter(|m| m.state == state)
                .count();
            Ok(n.to_string())
        }
        ["listed", name] => {
            let n = members(&socket)?.iter().filter(|m| m.name == *name).count();
            Ok(n.to_string())
        }
        ["state", name] => Ok(members(&socket)?
            .iter()
            .find(|m| m.name == *name)
            .map_or("absent".into(), |m| m.state.to_string())),
        ["member-field", name, field] => {
            let listing = members(&socket)?;
            let m = listing
                .iter()
                .find(|m| m.name == *name)
                .ok_or_else(|| format!("member-field: no member named {name} in the listing"))?;
            member_field(m, field)
        }
        ["states", rest @ ..] if rest.len() <= 1 => {
            // With MIN_UPTIME: only from an agent up that long (one exec per
            // sample: every exec is slow in the emulated VM).
            if let Some(min) = rest.first() {
                let min: u64 = min.parse().map_err(|_| {
                    format!("states: MIN_UPTIME {min:?} is not a number of seconds")
                })?;
                let up = status(&socket)?.uptime_secs;
                if up < min {
                    return Err(format!("states: agent up {up} s, less than {min} s"));
                }
            }
            let listing = members(&socket)?;
            let states: Vec<String> = listing
                .iter()
                .map(|m| format!("{}:{}", m.name, m.state))
                .collect();
            Ok(format!("{} {}", listing.len(), states.join(",")))
        }
        _ => Err(format!("unknown query '{}'; {USAGE}", words.join(" "))),
    }
}

/// Sends one request and returns its one reply.
fn ask(socket: &Path, req: Request) -> Result<Reply, String> {
    let name = format!("{req:?}").to_lowercase();
    let what = format!("{name} from {}", socket.display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))?;
    rt.block_on(async {
        let mut client = Client::request(socket, &req).await?;
        client.next().await
    })
    .map_err(|e| format!("{what}: {e}"))?
    .ok_or_else(|| format!("{what}: the agent closed the connection without a reply"))
}

fn members(socket: &Path) -> Result<Vec<MemberRow>, String> {
    match ask(socket, Request::Members)? {
        Reply::Members(m) => Ok(m),
        other => Err(format!("members: unexpected reply {other:?}")),
    }
}

fn status(socket: &Path) -> Result<Status, String> {
    match ask(socket, Request::Status)? {
        Reply::Status(s) => Ok(*s),
        other => Err(format!("status: unexpected reply {other:?}")),
    }
}

fn established(listing: &[MemberRow]) -> usize {
    listing
        .iter()
        .flat_map(|m| &m.links)
        .filter(|l: &&LinkRow| l.sa == LinkState::Established)
        .count()
}

/// One value of the status by field path; the counter maps (`gossip`,
/// `handshake`, `mesh`) by counter name.
fn status_value(s: &Status, keys: &[&str]) -> Result<String, String> {
    // Counter snapshots are typed structs; a counter is looked up by its
    // (JSON) name, so a misspelt or renamed one fails here, in one line.
    fn counter<T: serde::Serialize>(c: &T, group: &str, key: &str) -> Result<String, String> {
        serde_json::to_value(c)
            .ok()
            .and_then(|v| v.get(key).and_then(|n| n.as_u64()))
            .map(|n| n.to_string())
            .ok_or_else(|| format!("status: no counter {group}.{key}"))
    }
    Ok(match keys {
        ["name"] => s.name.clone(),
        ["version"] => s.version.clone(),
        ["public_key"] => s.public_key.clone(),
        ["fingerprint"] => s.fingerprint.clone(),
        ["generation"] => s.generation.to_string(),
        ["gossip_listen"] => s.gossip_listen.clone(),
        ["gossip_advertise"] => s.gossip_advertise.clone(),
        ["data_addrs"] => s.data_addrs.join(" "),
        ["handshake_port"] => s.handshake_port.to_string(),
        ["protocol"] => s.protocol.to_string(),
        ["uptime_secs"] => s.uptime_secs.to_string(),
        ["members", "alive"] => s.members.alive.to_string(),
        ["members", "suspect"] => s.members.suspect.to_string(),
        ["members", "dead"] => s.members.dead.to_string(),
        ["members", "left"] => s.members.left.to_string(),
        ["members", "refused"] => s.members.refused.to_string(),
        ["blocked"] => s.blocked.len().to_string(),
        ["conflicts"] => s.conflicts.len().to_string(),
        ["datapath"] => s.datapath.clone(),
        ["esp_algorithm"] => s.esp_algorithm.clone(),
        // "loaded", "autoloaded", "modprobed", "absent"; "none" when not probed.
        ["esp_offload", family] => s.esp_offload.get(*family).map_or("none".into(), |v| {
            serde_json::to_value(v)
                .ok()
                .and_then(|j| j.as_str().map(String::from))
                .unwrap_or_default()
        }),
        ["gossip", key] => counter(&s.gossip, "gossip", key)?,
        ["handshake", key] => counter(&s.handshake, "handshake", key)?,
        ["mesh", key] => counter(&s.mesh, "mesh", key)?,
        ["records", key] => counter(&s.records, "records", key)?,
        // Trust refusals by reason so far (0 when none), and right now.
        ["trust_refusals", reason] => s
            .trust_refusals
            .totals
            .get(*reason)
            .copied()
            .unwrap_or(0)
            .to_string(),
        ["trust_refused_now"] => s.trust_refusals.current.len().to_string(),
        ["cert", "expires_in_secs"] => s
            .cert
            .as_ref()
            .map_or("none".into(), |c| c.expires_in_secs.to_string()),
        ["cert", "fingerprint"] => s
            .cert
            .as_ref()
            .map_or("none".into(), |c| c.info.fingerprint.clone()),
        _ => return Err(format!("status: no field {}", keys.join("."))),
    })
}

/// One field of a member's row.
fn member_field(m: &MemberRow, field: &str) -> Result<String, String> {
    fn opt<T: ToString>(v: &Option<T>) -> String {
        v.as_ref().map(T::to_string).unwrap_or_default()
    }
    Ok(match field {
        "name" => m.name.clone(),
        "gossip_addr" => m.gossip_addr.to_string(),
        "data_addrs" => m
            .data_addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        "state" => m.state.to_string(),
        "fingerprint" => opt(&m.fingerprint),
        "public_key" => opt(&m.public_key),
        "generation" => m.generation.to_string(),
        "handshake_port" => opt(&m.handshake_port),
        "protocol" => opt(&m.protocol),
        "last_heard_ms" => m.last_heard_ms.to_string(),
        "is_self" => m.is_self.to_string(),
        "refused" => opt(&m.refused),
        "cert_not_after" => opt(&m.cert_not_after),
        _ => return Err(format!("members: no member field {field}")),
    })
}
