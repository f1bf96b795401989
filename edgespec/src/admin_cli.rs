//! `edgespec admin`: the coordinator's admin HTTP API from a terminal.
//!
//! Every subcommand is one or two calls to `/admin/v1/*` (docs/OPERATIONS.md, "Endpoints"),
//! printed as a table (or the API's JSON with `--json`). The bearer token comes from
//! `--token-file` or `EDGESPEC_ADMIN_TOKEN`, never from the command line (it would show in `ps`
//! and shell history). Over HTTPS the only trust root is the fleet CA given with `--ca`.
//! Fields the coordinator does not send (an older or newer coordinator) print as `-`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{Map, Value};

/// Environment variable holding the admin bearer token.
pub const TOKEN_ENV: &str = "EDGESPEC_ADMIN_TOKEN";

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The coordinator's admin address: a URL, or host:port (https when --ca is given).
    #[arg(
        long,
        env = "EDGESPEC_ADMIN_URL",
        default_value = "http://127.0.0.1:9464"
    )]
    url: String,
    /// File holding the bearer token (default: the EDGESPEC_ADMIN_TOKEN environment variable).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// PEM file of the fleet CA that signed the coordinator's certificate (HTTPS).
    #[arg(long, env = "EDGESPEC_ADMIN_CA")]
    ca: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(Subcommand, Debug)]
enum AdminCmd {
    /// Verify nodes and draft streams.
    Nodes,
    /// Open sessions.
    Sessions,
    /// The live policy.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Drain a verify node: no new sessions, its sessions move away at their next block.
    Drain { node: String },
    /// Cordon a verify node: no new sessions, its sessions stay.
    Cordon { node: String },
    /// Undo drain or cordon.
    Uncordon { node: String },
    /// A live view of sites, links, γ and acceptance, refreshed every --interval.
    Top {
        /// Time between refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Stop after this many views (default: until Ctrl-C).
        #[arg(long)]
        iterations: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Print the policy.
    Get,
    /// Change fields: `key=value` each (numbers, true/false, durations such as 5ms).
    Set {
        #[arg(required = true, value_name = "KEY=VALUE")]
        assignments: Vec<String>,
    },
}

/// Runs one `edgespec admin` command, writing its output to `out`.
pub async fn run(args: AdminArgs, out: &mut impl Write) -> Result<()> {
    let api = Api::new(&args)?;
    let json = args.json;
    match args.cmd {
        AdminCmd::Nodes => {
            let v = api.get("/admin/v1/nodes").await?;
            emit(out, json, &v, nodes_table)
        }
        AdminCmd::Sessions => {
            let v = api.get("/admin/v1/sessions").await?;
            emit(out, json, &v, sessions_table)
        }
        AdminCmd::Policy {
            cmd: PolicyCmd::Get,
        } => {
            let v = api.get("/admin/v1/policy").await?;
            emit(out, json, &v, policy_table)
        }
        AdminCmd::Policy {
            cmd: PolicyCmd::Set { assignments },
        } => {
            let patch = policy_patch(&assignments)?;
            let v = api.put("/admin/v1/policy", &patch).await?;
            emit(out, json, &v, policy_table)
        }
        AdminCmd::Drain { node } => node_action(&api, out, json, &node, "drain").await,
        AdminCmd::Cordon { node } => node_action(&api, out, json, &node, "cordon").await,
        AdminCmd::Uncordon { node } => node_action(&api, out, json, &node, "uncordon").await,
        AdminCmd::Top {
            interval,
            iterations,
        } => top(&api, out, interval, iterations).await,
    }
}

async fn node_action(
    api: &Api,
    out: &mut impl Write,
    json: bool,
    node: &str,
    action: &str,
) -> Result<()> {
    // The id is one path segment: refuse what would change the path rather than encode it.
    if node.is_empty() || node.contains(['/', '?', '#', '%']) {
        bail!("{node:?} is not a verify node id");
    }
    let v = api
        .post(&format!("/admin/v1/verifiers/{node}/{action}"))
        .await?;
    emit(out, json, &v, |v| {
        format!("{}: {}\n", text(&v["id"]), text(&v["admin"]))
    })
}

/// `top`: one view per interval; a terminal gets the screen cleared between views.
async fn top(
    api: &Api,
    out: &mut impl Write,
    interval: Duration,
    iterations: Option<u64>,
) -> Result<()> {
    let clear = std::io::stdout().is_terminal();
    let mut shown = 0u64;
    loop {
        let nodes = api.get("/admin/v1/nodes").await?;
        let sessions = api.get("/admin/v1/sessions").await?;
        if clear {
            write!(out, "\x1b[2J\x1b[H")?;
        }
        write!(out, "{}", top_view(&nodes, &sessions))?;
        out.flush()?;
        shown += 1;
        if iterations.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
        writeln!(out)?;
    }
}

/// The HTTP side: base URL, token, client.
struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(args: &AdminArgs) -> Result<Api> {
        let token = match &args.token_file {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("reading the token file {}", p.display()))?
                .trim()
                .to_string(),
            None => std::env::var(TOKEN_ENV).unwrap_or_default(),
        };
        if token.is_empty() {
            bail!("no admin token: set {TOKEN_ENV} or pass --token-file");
        }
        let mut base = args.url.trim_end_matches('/').to_string();
        if !base.contains("://") {
            let scheme = if args.ca.is_some() { "https" } else { "http" };
            base = format!("{scheme}://{base}");
        }
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(ca) = &args.ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the CA file {}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", ca.display()))?;
            http = http.add_root_certificate(cert);
        } else if base.starts_with("https://") {
            bail!("{base} is HTTPS: pass --ca with the fleet CA that signed its certificate");
        }
        Ok(Api {
            base,
            token,
            http: http.build()?,
        })
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post(&self, path: &str) -> Result<Value> {
        self.send(self.http.post(self.url(path))).await
    }

    async fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| {
                format!("cannot reach the coordinator's admin API at {}", self.base)
            })?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!("the coordinator refused the token (401): check {TOKEN_ENV} or --token-file");
        }
        if !status.is_success() {
            let why = body["error"].as_str().unwrap_or("no details");
            bail!("{status}: {why}");
        }
        Ok(body)
    }
}

fn emit(
    out: &mut impl Write,
    json: bool,
    v: &Value,
    table: impl Fn(&Value) -> String,
) -> Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
    } else {
        write!(out, "{}", table(v))?;
    }
    Ok(())
}

/// `key=value` pairs as a policy patch: a value that reads as JSON (3, 0.5, true) is that,
/// anything else (5ms) a string.
fn policy_patch(assignments: &[String]) -> Result<Value> {
    let mut patch = Map::new();
    for a in assignments {
        let Some((key, value)) = a.split_once('=') else {
            bail!("{a:?}: expected key=value, e.g. gamma_max=4 or batch_window=3ms");
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
        patch.insert(key.trim().to_string(), value);
    }
    Ok(Value::Object(patch))
}

/// A value as table text: strings bare, numbers rounded, missing as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn items<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key].as_array().map_or(&[], Vec::as_slice)
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// A table's columns: (header, field of the API's JSON).
type Columns = [(&'static str, &'static str)];

const VERIFIER_COLUMNS: &Columns = &[
    ("ID", "id"),
    ("POOL", "pool"),
    ("HEALTH", "health"),
    ("ADMIN", "admin"),
    ("SESSIONS", "sessions"),
    ("CAPACITY", "capacity"),
    ("QUEUED", "queued_tokens"),
    ("DELAY_MS", "predicted_queue_delay_ms"),
    ("DEVICE", "device"),
    ("ADDR", "addr"),
];

const DRAFT_COLUMNS: &Columns = &[
    ("NODE", "node_id"),
    ("STREAM", "stream"),
    ("METHOD", "method"),
    ("SESSIONS", "sessions"),
    ("RTT_MS", "rtt_ms"),
    ("BANDWIDTH_B/S", "bandwidth_bytes_per_s"),
    ("DRAFT_MS/TOK", "draft_ms_per_token"),
    ("ACCEPTANCE", "acceptance"),
    ("PIPELINED", "pipelined"),
];

/// One row per (draft stream, drafting method): `drafts[].methods[]`.
const DRAFT_METHOD_COLUMNS: &Columns = &[
    ("METHOD", "method"),
    ("SESSIONS", "sessions"),
    ("ROUNDS", "rounds"),
    ("ACCEPTANCE", "acceptance"),
    ("MEAN_GAMMA", "mean_gamma"),
    ("DRAFT_MS/TOK", "draft_ms_per_token"),
    ("PLANNED_MS/TOK", "planned_draft_ms_per_token"),
];

const SESSION_COLUMNS: &Columns = &[
    ("ID", "id"),
    ("DRAFT", "draft_node"),
    ("METHOD", "method"),
    ("VERIFIER", "verifier"),
    ("GAMMA", "gamma"),
    ("ALPHA", "alpha"),
    ("ROUNDS", "rounds"),
    ("DRAFTED", "drafted_tokens"),
    ("ACCEPTED", "accepted_tokens"),
];

/// The objects of `v[key]` as a table with these columns.
fn objects_table(v: &Value, key: &str, columns: &Columns) -> String {
    let header: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
    let rows: Vec<Vec<String>> = items(v, key)
        .iter()
        .map(|o| columns.iter().map(|(_, k)| text(&o[*k])).collect())
        .collect();
    table(&header, &rows)
}

fn nodes_table(v: &Value) -> String {
    format!(
        "coordinator {}  fleet {}\n\nverify nodes ({})\n{}\ndraft streams ({})\n{}\n\
         drafting methods\n{}",
        text(&v["coordinator_id"]),
        text(&v["fleet_fingerprint"]),
        items(v, "verifiers").len(),
        objects_table(v, "verifiers", VERIFIER_COLUMNS),
        items(v, "drafts").len(),
        objects_table(v, "drafts", DRAFT_COLUMNS),
        draft_methods_table(v),
    )
}

/// Acceptance, mean γ and rounds of each draft stream's sessions by drafting method.
fn draft_methods_table(v: &Value) -> String {
    let mut header = vec!["NODE", "STREAM"];
    header.extend(DRAFT_METHOD_COLUMNS.iter().map(|(h, _)| *h));
    let rows: Vec<Vec<String>> = items(v, "drafts")
        .iter()
        .flat_map(|d| {
            items(d, "methods").iter().map(move |m| {
                let mut row = vec![text(&d["node_id"]), text(&d["stream"])];
                row.extend(DRAFT_METHOD_COLUMNS.iter().map(|(_, k)| text(&m[*k])));
                row
            })
        })
        .collect();
    table(&header, &rows)
}

fn sessions_table(v: &Value) -> String {
    format!(
        "{} sessions\n{}",
        text(&v["count"]),
        objects_table(v, "sessions", SESSION_COLUMNS)
    )
}

fn policy_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_object()
        .map(|m| m.iter().map(|(k, v)| vec![k.clone(), text(v)]).collect())
        .unwrap_or_default();
    table(&["POLICY", "VALUE"], &rows)
}

/// One `top` view: per site (pool) capacity and load, per link (draft stream) RTT, bandwidth,
/// mean γ and acceptance of its sessions.
fn top_view(nodes: &Value, sessions: &Value) -> String {
    let verifiers = items(nodes, "verifiers");
    let mut pools: Vec<&str> = verifiers
        .iter()
        .filter_map(|n| n["pool"].as_str())
        .collect();
    pools.sort_unstable();
    pools.dedup();
    let sites: Vec<Vec<String>> = pools
        .iter()
        .map(|pool| {
            let here: Vec<&Value> = verifiers.iter().filter(|n| n["pool"] == *pool).collect();
            let sum = |k: &str| -> u64 { here.iter().filter_map(|n| n[k].as_u64()).sum() };
            let up = here.iter().filter(|n| n["health"] == "up").count();
            let active = here.iter().filter(|n| n["admin"] == "active").count();
            vec![
                pool.to_string(),
                format!("{up}/{}", here.len()),
                active.to_string(),
                format!("{}/{}", sum("sessions"), sum("capacity")),
                sum("queued_tokens").to_string(),
            ]
        })
        .collect();
    let all_sessions = items(sessions, "sessions");
    let links: Vec<Vec<String>> = items(nodes, "drafts")
        .iter()
        .map(|d| {
            let node = d["node_id"].as_str().unwrap_or_default();
            let gammas: Vec<f64> = all_sessions
                .iter()
                .filter(|s| s["draft_node"] == node)
                .filter_map(|s| s["gamma"].as_f64())
                .collect();
            let mean_gamma = (!gammas.is_empty())
                .then(|| format!("{:.1}", gammas.iter().sum::<f64>() / gammas.len() as f64));
            vec![
                node.to_string(),
                text(&d["sessions"]),
                text(&d["rtt_ms"]),
                text(&d["bandwidth_bytes_per_s"]),
                mean_gamma.unwrap_or_else(|| "-".into()),
                text(&d["acceptance"]),
            ]
        })
        .collect();
    let (drafted, accepted) = all_sessions.iter().fold((0u64, 0u64), |(d, a), s| {
        (
            d + s["drafted_tokens"].as_u64().unwrap_or(0),
            a + s["accepted_tokens"].as_u64().unwrap_or(0),
        )
    });
    let acceptance = if drafted > 0 {
        format!("{:.1}%", 100.0 * accepted as f64 / drafted as f64)
    } else {
        "-".into()
    };
    format!(
        "edgespec top  coordinator {}  sessions {}  acceptance {acceptance}\n\nsites\n{}\nlinks\n{}",
        text(&nodes["coordinator_id"]),
        all_sessions.len(),
        table(
            &["SITE", "VERIFY_UP", "ACTIVE", "SESSIONS/CAP", "QUEUED"],
            &sites
        ),
        table(
            &["DRAFT", "SESSIONS", "RTT_MS", "BANDWIDTH_B/S", "GAMMA", "ACCEPTANCE"],
            &links
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn policy_assignments_become_a_typed_patch() {
        let p = policy_patch(&[
            "gamma_max=4".into(),
            "batch_window=3ms".into(),
            "speculation_enabled=false".into(),
        ])
        .unwrap();
        assert_eq!(
            p,
            json!({"gamma_max": 4, "batch_window": "3ms", "speculation_enabled": false})
        );
        assert!(policy_patch(&["gamma_max".into()]).is_err());
    }

    #[test]
    fn top_summarises_sites_and_links() {
        let nodes = json!({
            "coordinator_id": "coord-1",
            "verifiers": [
                {"id": "a", "pool": "onprem", "health": "up", "admin": "active", "sessions": 2, "capacity": 8, "queued_tokens": 5},
                {"id": "b", "pool": "cloud", "health": "down", "admin": "draining", "sessions": 0, "capacity": 4, "queued_tokens": 0}
            ],
            "drafts": [{"node_id": "edge-1", "sessions": 2, "rtt_ms": 41.5, "bandwidth_bytes_per_s": 1.0e6, "acceptance": 0.75}]
        });
        let sessions = json!({"count": 2, "sessions": [
            {"draft_node": "edge-1", "gamma": 4, "drafted_tokens": 80, "accepted_tokens": 60},
            {"draft_node": "edge-1", "gamma": 2, "drafted_tokens": 20, "accepted_tokens": 15}
        ]});
        let view = top_view(&nodes, &sessions);
        assert!(view.contains("acceptance 75.0%"), "{view}");
        let onprem = view.lines().find(|l| l.starts_with("onprem")).unwrap();
        assert!(onprem.contains("1/1") && onprem.contains("2/8"), "{view}");
        let cloud = view.lines().find(|l| l.starts_with("cloud")).unwrap();
        assert!(cloud.contains("0/1") && cloud.contains("0/4"), "{view}");
        let link = view.lines().find(|l| l.starts_with("edge-1")).unwrap();
        assert!(link.contains("41.50") && link.contains(" 3.0 "), "{view}");
    }

    #[test]
    fn nodes_list_each_draft_streams_methods() {
        let nodes = json!({
            "coordinator_id": "coord-1",
            "fleet_fingerprint": "fp",
            "verifiers": [],
            "drafts": [{"node_id": "edge-1", "stream": 3, "method": "model", "sessions": 2,
                "methods": [
                    {"method": "model", "sessions": 1, "rounds": 10, "acceptance": 0.5,
                     "mean_gamma": 0.0, "draft_ms_per_token": 80.0,
                     "planned_draft_ms_per_token": 80.0},
                    {"method": "lookup", "sessions": 1, "rounds": 7, "acceptance": 0.9,
                     "mean_gamma": 4.5, "draft_ms_per_token": 0.01,
                     "planned_draft_ms_per_token": 0.01}
                ]}]
        });
        let view = nodes_table(&nodes);
        let stream = view.lines().find(|l| l.starts_with("edge-1")).unwrap();
        assert!(stream.contains("model"), "{view}");
        let lookup = view
            .lines()
            .find(|l| l.starts_with("edge-1") && l.contains("lookup"))
            .unwrap_or_else(|| panic!("no lookup row: {view}"));
        let cells: Vec<&str> = lookup.split_whitespace().collect();
        assert_eq!(&cells[..5], &["edge-1", "3", "lookup", "1", "7"], "{view}");
        assert!(cells.contains(&"4.50"), "{view}");
    }
}
