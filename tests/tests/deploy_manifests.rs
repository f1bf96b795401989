//! Static validation of `deploy/`: systemd units, Kubernetes manifests, configuration overlays and
//! container files. Each check runs a real validator and fails with the validator's own messages;
//! a missing tool is a failure that says how to install it, never a silent skip.
//!
//! Tools: `systemd-analyze` (systemd >= 250), `python3` >= 3.11 (tomllib) and the
//! `kubernetes-validate` PyPI package, installed on first use with
//! `python3 -m pip install --target $HOME/.cache/edgespec/pytools/kubernetes-validate`.
//! `kubectl`, where present, additionally renders every kustomization.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command, what: &str, install_hint: &str) -> Output {
    match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("{what}: cannot run {cmd:?}: {e}. {install_hint}"),
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A fresh scratch directory (no tempfile dependency), removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "edgespec-deploy-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// systemd

const SYSTEMD_HINT: &str =
    "Install systemd (Debian: apt-get install systemd) to get systemd-analyze.";

/// `(key, value)` of every directive in the unit's `[section]`.
fn directives(unit: &str, section: &str) -> Vec<(String, String)> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in unit.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            current = line.trim_matches(|c| c == '[' || c == ']').to_string();
        } else if current == section {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

/// Copies `unit` into `dir` with every `/usr/local/bin/edgespec-*` executable replaced by an
/// executable stub in `dir/bin`, so `systemd-analyze verify` checks everything else for real
/// (it refuses units whose ExecStart binary does not exist, and `--root` needs a whole systemd
/// tree). Returns the copy's path.
fn unit_copy_with_stubs(unit: &Path, dir: &Path) -> PathBuf {
    let src = fs::read_to_string(unit).expect("read unit");
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).expect("mkdir bin");
    let mut stubbed = 0;
    for word in src.split_whitespace() {
        let word = word.trim_start_matches(|c: char| c != '/');
        if let Some(name) = word.strip_prefix("/usr/local/bin/") {
            let stub = bin.join(name);
            fs::write(&stub, "#!/bin/sh\nexit 0\n").expect("write stub");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).expect("chmod stub");
            }
            stubbed += 1;
        }
    }
    assert!(
        stubbed > 0,
        "{}: ExecStart does not run a /usr/local/bin/edgespec-* binary",
        unit.display()
    );
    let copy = dir.join(unit.file_name().expect("unit file name"));
    fs::write(
        &copy,
        src.replace("/usr/local/bin/", &format!("{}/", bin.display())),
    )
    .expect("write unit copy");
    copy
}

/// Runs `systemd-analyze verify` and returns its complaints: it exits 0 on unknown keys and
/// unparsable values (it only logs "ignoring"), so any output at all is a finding.
fn systemd_verify(unit: &Path) -> Result<(), String> {
    let out = run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(unit),
        "systemd-analyze verify",
        SYSTEMD_HINT,
    );
    let msgs = text(&out);
    if out.status.success() && msgs.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("exit {:?}:\n{msgs}", out.status.code()))
    }
}

#[test]
fn systemd_units_pass_systemd_analyze_verify_and_security() {
    let dir = repo_root().join("deploy/systemd");
    let units = files_with_suffix(&dir, ".service");
    let names: Vec<_> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "edgespec-coordinator.service",
        "edgespec-draft-node.service",
        "edgespec-verify-node.service",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "deploy/systemd/{want} is missing"
        );
    }
    let scratch = Scratch::new("systemd");

    // The check must be able to fail: a unit with a misspelt key must be reported.
    let probe = scratch.0.join("probe");
    fs::create_dir_all(&probe).unwrap();
    let good = unit_copy_with_stubs(&units[0], &probe);
    let bad = probe.join("edgespec-probe.service");
    fs::write(
        &bad,
        fs::read_to_string(&good)
            .unwrap()
            .replace("[Service]", "[Service]\nRestartt=always\nRestartSec=soon"),
    )
    .unwrap();
    assert!(
        systemd_verify(&bad).is_err(),
        "systemd-analyze verify did not report a misspelt key; this check would prove nothing"
    );

    let mut failures = Vec::new();
    for unit in &units {
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        let src = fs::read_to_string(unit).unwrap();
        let service = directives(&src, "Service");
        let get = |k: &str| -> Vec<&str> {
            service
                .iter()
                .filter(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let mut require = |k: &str, ok: &dyn Fn(&str) -> bool, why: &str| {
            let vals = get(k);
            if !vals.iter().any(|v| ok(v)) {
                failures.push(format!("{name}: [Service] {k}= {why} (found {vals:?})"));
            }
        };
        require("Restart", &|v| v == "on-failure", "must be on-failure");
        require("RestartSec", &|v| !v.is_empty(), "must be set");
        require("ProtectSystem", &|v| v == "strict", "must be strict");
        require("ProtectHome", &|v| v == "yes" || v == "true", "must be yes");
        require("PrivateTmp", &|v| v == "yes" || v == "true", "must be yes");
        require(
            "NoNewPrivileges",
            &|v| v == "yes" || v == "true",
            "must be yes",
        );
        require("KillSignal", &|v| v == "SIGTERM", "must be SIGTERM");
        require(
            "TimeoutStopSec",
            &|v| {
                v.trim_end_matches('s')
                    .parse::<u32>()
                    .is_ok_and(|s| s >= 60)
            },
            "must allow at least 60 s for a graceful drain",
        );
        require(
            "EnvironmentFile",
            &|v| v.starts_with("-/etc/edgespec/") && v.ends_with(".env"),
            "must be an optional -/etc/edgespec/<unit>.env",
        );
        require(
            "ExecStart",
            &|v| v.starts_with("/usr/local/bin/edgespec-") && v.contains("--config /etc/edgespec/"),
            "must run /usr/local/bin/edgespec-... --config /etc/edgespec/...",
        );
        // The coordinator loads no model; the draft and verify nodes share one model cache.
        if name != "edgespec-coordinator.service" {
            require(
                "Environment",
                &|v| v.starts_with("EDGESPEC_MODEL_DIR=/var/cache/edgespec"),
                "must point EDGESPEC_MODEL_DIR into the unit's cache directory",
            );
            require("CacheDirectory", &|v| v == "edgespec", "must be edgespec");
        }
        let user_ok = get("DynamicUser").contains(&"yes") || !get("User").is_empty();
        if !user_ok {
            failures.push(format!(
                "{name}: needs DynamicUser=yes or a dedicated User="
            ));
        }

        let work = scratch.0.join(name.trim_end_matches(".service"));
        fs::create_dir_all(&work).unwrap();
        let copy = unit_copy_with_stubs(unit, &work);
        if let Err(e) = systemd_verify(&copy) {
            failures.push(format!("{name}: systemd-analyze verify: {e}"));
        }
        // Exposure score 0-100 (shown as 0.0-10.0); every unit is well under 4.0.
        let out = run(
            Command::new("systemd-analyze")
                .args(["security", "--offline=yes", "--threshold=40", "--no-pager"])
                .arg(&copy),
            "systemd-analyze security",
            SYSTEMD_HINT,
        );
        let report = text(&out);
        let summary = report
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("no exposure summary")
            .to_string();
        println!("{name}: systemd-analyze verify clean; {summary}");
        if !out.status.success() {
            failures.push(format!(
                "{name}: systemd-analyze security exposure above 4.0:\n{report}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "systemd unit problems:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Python checks (deploy/tools/check_deploy.py)

const PYTHON_HINT: &str = "Install python3 >= 3.11 (tomllib).";

fn pytools_dir() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    PathBuf::from(home).join(".cache/edgespec/pytools/kubernetes-validate")
}

fn python_imports(pythonpath: &Path, module: &str) -> bool {
    Command::new("python3")
        .env("PYTHONPATH", pythonpath)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes `kubernetes_validate` importable from [`pytools_dir`], installing it if needed.
fn ensure_kubernetes_validate() -> PathBuf {
    let dir = pytools_dir();
    if python_imports(&dir, "kubernetes_validate") {
        return dir;
    }
    let out = run(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&dir)
            .arg("kubernetes-validate"),
        "installing kubernetes-validate",
        PYTHON_HINT,
    );
    assert!(
        out.status.success(),
        "could not install kubernetes-validate into {} (needs PyPI access or a mirror via \
         PIP_INDEX_URL):\n{}",
        dir.display(),
        text(&out)
    );
    assert!(
        python_imports(&dir, "kubernetes_validate"),
        "kubernetes-validate installed into {} but does not import",
        dir.display()
    );
    dir
}

fn check_deploy_output(
    subcommand: &str,
    pythonpath: Option<&Path>,
    args: &[&std::ffi::OsStr],
) -> Output {
    let root = repo_root();
    let mut cmd = Command::new("python3");
    cmd.arg(root.join("deploy/tools/check_deploy.py"))
        .arg(subcommand)
        .args(args)
        .current_dir(&root);
    if let Some(p) = pythonpath {
        cmd.env("PYTHONPATH", p);
    }
    run(&mut cmd, "deploy/tools/check_deploy.py", PYTHON_HINT)
}

fn check_deploy(subcommand: &str, pythonpath: Option<&Path>, args: &[&std::ffi::OsStr]) {
    let out = check_deploy_output(subcommand, pythonpath, args);
    let report = text(&out);
    println!("{report}");
    assert!(
        out.status.success(),
        "deploy/tools/check_deploy.py {subcommand} found problems:\n{report}"
    );
}

#[test]
fn config_overlays_set_only_keys_that_exist_in_the_crate_defaults() {
    check_deploy("config", None, &[]);
}

/// The `/metrics` text of every node kind, from the crates' own metrics modules: the names (and
/// types) the rules, the dashboard, the KEDA queries and the docs may use. A labelled family
/// shows only once it has a child, so each gets one. The runtime adds the certificate expiry
/// gauge to every node's `/metrics` (in mtls mode only, so it is named here).
fn exported_metrics() -> String {
    use edgespec_coordinator::metrics::PoolLabel;
    let coordinator = edgespec_coordinator::metrics::Metrics::new();
    coordinator.session_error(edgespec_proto::domain::ErrorCode::Unavailable);
    let pool = PoolLabel {
        pool: "cloud".into(),
    };
    coordinator.pool_sessions.get_or_create(&pool).set(0);
    coordinator.pool_capacity.get_or_create(&pool).set(0);
    coordinator.pool_queued_tokens.get_or_create(&pool).set(0);
    coordinator.pool_verifiers_up.get_or_create(&pool).set(0);
    coordinator.set_link("edge-1", 0.05, 1e6);
    let draft = edgespec_draft_node::metrics::Metrics::new();
    draft.request("chat", "ok");
    let lookup = edgespec_proto::domain::DraftMethod::Lookup;
    draft.round("code", lookup, 4, 3, std::time::Duration::from_millis(30));
    let verify = edgespec_verify_node::metrics::Metrics::new();
    verify.session_error("resync_needed");
    let tls = format!(
        "# TYPE {} gauge\n",
        edgespec_runtime::tls::CERT_EXPIRY_METRIC
    );
    [coordinator.encode(), draft.render(), verify.encode(), tls].join("\n")
}

#[test]
fn monitoring_scrapes_every_node_and_alerts_and_dashboard_use_exported_metrics() {
    let metrics = exported_metrics();
    assert!(
        metrics.contains("# TYPE edgespec_coordinator_cloud_demand gauge")
            && metrics.contains("# TYPE edgespec_draft_round_trip_seconds histogram")
            && metrics.contains("# TYPE edgespec_verify_forwards counter"),
        "the expositions lack their TYPE lines; the checker needs them:\n{metrics}"
    );
    let pythonpath = ensure_kubernetes_validate();
    let scratch = Scratch::new("metrics");
    let file = scratch.0.join("metrics.txt");
    fs::write(&file, &metrics).unwrap();

    // The check must be able to fail: a metric no node exports must be reported.
    let bogus = scratch.0.join("bogus.txt");
    fs::write(
        &bogus,
        metrics.replace(
            "edgespec_draft_emitted_tokens",
            "edgespec_draft_emitted_tokenz",
        ),
    )
    .unwrap();
    let out = check_deploy_output(
        "monitoring",
        Some(&pythonpath),
        &["--metrics".as_ref(), bogus.as_os_str()],
    );
    assert!(
        !out.status.success() && text(&out).contains("edgespec_draft_emitted_tokens_total"),
        "the monitoring check did not report a metric the nodes do not export:\n{}",
        text(&out)
    );

    check_deploy(
        "monitoring",
        Some(&pythonpath),
        &["--metrics".as_ref(), file.as_os_str()],
    );
}

#[test]
fn the_deployment_walkthrough_runs_in_order_and_names_only_what_exists() {
    let pythonpath = ensure_kubernetes_validate();
    check_deploy("docs", Some(&pythonpath), &[]);
}

#[test]
fn kubernetes_manifests_validate_against_the_schema_and_each_other() {
    let pythonpath = ensure_kubernetes_validate();
    check_deploy("k8s", Some(&pythonpath), &[]);

    // Rendering every kustomization catches what per-file validation cannot (a resource path
    // kustomize refuses, a bad image override). kubectl is optional in CI; say so when absent.
    let k8s = repo_root().join("deploy/k8s");
    let mut dirs = vec![k8s.clone()];
    for entry in fs::read_dir(&k8s).unwrap() {
        let p = entry.unwrap().path();
        if p.join("kustomization.yaml").exists() {
            dirs.push(p);
        }
    }
    match Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
    {
        Ok(o) if o.status.success() => {
            for d in dirs {
                let out = Command::new("kubectl")
                    .arg("kustomize")
                    .arg(&d)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "kubectl kustomize {} failed:\n{}",
                    d.display(),
                    text(&out)
                );
                println!("kubectl kustomize {}: ok", d.display());
            }
        }
        _ => eprintln!(
            "NOTE: kubectl not found: the kustomizations were checked structurally only \
             (resources exist, every manifest is listed), not rendered"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Container files (no Docker engine here: structural checks)

fn workspace_packages(root: &Path) -> Vec<(String, PathBuf)> {
    let ws = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = ws
        .split("members")
        .nth(1)
        .and_then(|s| s.split('[').nth(1))
        .and_then(|s| s.split(']').next())
        .expect("workspace members");
    members
        .split(',')
        .map(|m| m.trim().trim_matches('"').trim())
        .filter(|m| !m.is_empty())
        .map(|m| {
            let manifest = root.join(m).join("Cargo.toml");
            let src = fs::read_to_string(&manifest)
                .unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
            let name = src
                .lines()
                .find_map(|l| l.strip_prefix("name = "))
                .expect("package name")
                .trim_matches('"')
                .to_string();
            (name, manifest)
        })
        .collect()
}

#[test]
fn container_files_build_existing_packages_as_non_root_with_mounted_models() {
    let root = repo_root();
    let dir = root.join("deploy/container");
    let packages = workspace_packages(&root);
    let mut failures = Vec::new();

    let ignore =
        fs::read_to_string(dir.join(".dockerignore")).expect("deploy/container/.dockerignore");
    for f in [
        "Dockerfile.cpu.dockerignore",
        "Dockerfile.cuda.dockerignore",
    ] {
        match fs::read_to_string(dir.join(f)) {
            Ok(s) if s == ignore => {}
            Ok(_) => failures.push(format!("{f} differs from .dockerignore")),
            Err(e) => failures.push(format!("{f}: {e}")),
        }
    }
    for line in ignore.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let needed = packages
            .iter()
            .map(|(_, m)| {
                m.parent()
                    .unwrap()
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .chain(["Cargo.toml".into(), "Cargo.lock".into()]);
        for n in needed {
            if line.trim_end_matches('/') == n || line == "*" || line == "**" {
                failures.push(format!(
                    ".dockerignore excludes `{n}`, which the build needs"
                ));
            }
        }
    }

    for (file, features) in [
        ("Dockerfile.cpu", &[][..]),
        ("Dockerfile.cuda", &["edgespec-verify-node/cuda"][..]),
    ] {
        let src = fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let froms = src.lines().filter(|l| l.starts_with("FROM ")).count();
        if froms < 2 {
            failures.push(format!("{file}: not multi-stage ({froms} FROM)"));
        }
        // The words of every `cargo build ...` command (up to the next `&&`).
        let words: Vec<&str> = src
            .split("cargo build")
            .skip(1)
            .flat_map(|cmd| {
                cmd.split("&&")
                    .next()
                    .unwrap_or("")
                    .split(|c: char| c.is_whitespace() || c == '\\')
                    .filter(|w| !w.is_empty())
            })
            .collect();
        let built: Vec<&str> = words
            .windows(2)
            .filter(|w| w[0] == "-p")
            .map(|w| w[1])
            .collect();
        if built.is_empty() {
            failures.push(format!("{file}: no `cargo build -p ...`"));
        }
        for p in &built {
            if !packages.iter().any(|(n, _)| n == p) {
                failures.push(format!("{file}: builds `-p {p}`, not a workspace package"));
            }
        }
        if !src.contains("cargo build --release") {
            failures.push(format!("{file}: no release build"));
        }
        for f in features {
            if !src.contains(&format!("--features {f}")) {
                failures.push(format!("{file}: must build with --features {f}"));
            }
            let (pkg, feat) = f.split_once('/').unwrap();
            let manifest = packages.iter().find(|(n, _)| n == pkg).map(|(_, m)| m);
            let has = manifest.is_some_and(|m| {
                let s = fs::read_to_string(m).unwrap();
                s.split("[features]").nth(1).is_some_and(|t| {
                    t.lines().any(|l| {
                        l.trim_start().starts_with(&format!("{feat} "))
                            || l.trim_start().starts_with(&format!("{feat}="))
                    })
                })
            });
            if !has {
                eprintln!(
                    "NOTE: {pkg} has no `{feat}` feature yet: {file} will not build until it \
                     lands (expected: {feat} = [\"edgespec-model/{feat}\"])"
                );
            }
        }
        for line in src.lines().filter(|l| l.contains("target/release/")) {
            for w in line.split_whitespace() {
                if let Some(bin) = w.strip_prefix("target/release/") {
                    if !built.contains(&bin) {
                        failures.push(format!(
                            "{file}: copies target/release/{bin}, which is not built"
                        ));
                    }
                }
            }
        }
        let last_user = src
            .lines()
            .filter_map(|l| l.strip_prefix("USER "))
            .next_back()
            .map(str::trim);
        match last_user {
            Some(u) if !u.starts_with("root") && !u.starts_with("0") => {}
            other => failures.push(format!(
                "{file}: runtime stage must end non-root (USER {other:?})"
            )),
        }
        if !src.contains("EDGESPEC_MODEL_DIR=/models") {
            failures.push(format!("{file}: must set EDGESPEC_MODEL_DIR=/models"));
        }
        if src
            .lines()
            .any(|l| (l.starts_with("COPY") || l.starts_with("ADD")) && l.contains(".gguf"))
        {
            failures.push(format!("{file}: models must be mounted, not baked in"));
        }
    }
    assert!(
        failures.is_empty(),
        "container file problems:\n{}",
        failures.join("\n")
    );
}
