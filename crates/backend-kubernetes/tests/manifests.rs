//! `deploy/kubernetes/`: the base and the postgres overlay render with
//! `kubectl kustomize`, validate offline against the API schemas
//! (`kubernetes-validate`), pass `checkov` with no failed check, and the
//! gateway's Role grants exactly the verbs the backend's code uses on pods.
//! Needs `kubectl`, and `kubernetes-validate` and `checkov` from PyPI (`.ci/run`
//! installs the pinned versions); without them the test fails saying so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use aishell_backend_kubernetes::POD_VERBS;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

/// The virtualenv `.ci/run` installs the pinned Python tools into.
const TOOLS_VENV: &str = "aishell-k8s-tools-checkov-3.3.30-kv-1.37.0";

/// `program` from PATH, else from the tools' virtualenv.
fn locate(program: &str) -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    let in_venv = cache.map(|c| c.join(TOOLS_VENV).join("bin").join(program));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    match in_venv {
        Some(path) if !on_path && path.is_file() => path,
        _ => PathBuf::from(program),
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(locate(program)).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {program} ({e}): the manifest test needs kubectl, kubernetes-validate and checkov; .ci/run installs the pinned Python tools in ~/.cache/{TOOLS_VENV}"
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every kustomization, rendered into `dir`.
fn render(dir: &Path) -> Vec<(String, String)> {
    ["base", "overlays/postgres"]
        .iter()
        .map(|k| {
            let rendered = run(
                "kubectl",
                &["kustomize", deploy_dir().join(k).to_str().unwrap()],
            );
            let file = dir.join(format!("{}.yaml", k.replace('/', "-")));
            std::fs::write(&file, &rendered).unwrap();
            (file.display().to_string(), rendered)
        })
        .collect()
}

/// The verbs of the rendered Role (kustomize writes lists as block lists).
fn role_verbs(rendered: &str) -> BTreeSet<String> {
    let role = rendered
        .split("\n---\n")
        .find(|doc| doc.lines().any(|l| l == "kind: Role"))
        .expect("a Role");
    role.lines()
        .skip_while(|l| !l.trim_start().starts_with("verbs:"))
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| l.trim_start().trim_start_matches("- ").trim().to_string())
        .collect()
}

/// The verbs the backend's own code uses: each kube `Api` call it makes on
/// pods, read from its source.
fn verbs_in_code() -> BTreeSet<String> {
    let source =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let calls = [
        ("pods.create(", "create"),
        ("pods.get_opt(", "get"),
        ("pods.get(", "get"),
        ("pods.list(", "list"),
        ("pods.delete(", "delete"),
        ("pods.delete_collection(", "deletecollection"),
        ("pods.patch", "patch"),
        ("pods.replace", "update"),
        // A watcher lists, then watches.
        ("watcher(pods", "list"),
        ("watcher(pods", "watch"),
    ];
    calls
        .iter()
        .filter(|(call, _)| source.contains(call))
        .map(|(_, verb)| verb.to_string())
        .collect()
}

#[test]
fn the_role_grants_exactly_the_verbs_the_code_uses() {
    let declared: BTreeSet<String> = POD_VERBS.iter().map(|v| v.to_string()).collect();
    assert_eq!(verbs_in_code(), declared, "POD_VERBS matches the code");
    let dir = tempfile::tempdir().unwrap();
    for (file, rendered) in render(dir.path()) {
        assert_eq!(role_verbs(&rendered), declared, "the Role in {file}");
        assert!(
            rendered.contains("- pods\n"),
            "the Role is about pods: {file}"
        );
    }
}

#[test]
fn the_manifests_render_validate_and_pass_checkov() {
    let dir = tempfile::tempdir().unwrap();
    let rendered = render(dir.path());
    for (file, text) in &rendered {
        for kind in [
            "Deployment",
            "Service",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ConfigMap",
            "PersistentVolumeClaim",
            "NetworkPolicy",
            "PodDisruptionBudget",
        ] {
            assert!(
                text.lines().any(|l| l == format!("kind: {kind}")),
                "{file} has a {kind}"
            );
        }
        let out = run(
            "kubernetes-validate",
            &["--strict", "--kubernetes-version", "1.33.0", file],
        );
        assert!(!out.contains("ERROR"), "{out}");
    }
    // Offline: no download of policies or of the platform's guidelines.
    // Files by name: checkov skips directories whose name starts with a dot
    // (as temporary directories' do).
    let mut args = vec!["--framework", "kubernetes", "--skip-download", "-o", "json"];
    for (file, _) in &rendered {
        args.extend(["--file", file.as_str()]);
    }
    let out = run("checkov", &args);
    let report: serde_json::Value = serde_json::from_str(&out).expect("checkov's JSON report");
    let summary = &report["summary"];
    assert_eq!(summary["failed"], 0, "checkov: {out}");
    assert_eq!(summary["parsing_errors"], 0, "checkov: {summary}");
    assert!(
        summary["resource_count"].as_u64() >= Some(20),
        "checkov saw the resources: {summary}"
    );
    assert!(summary["passed"].as_u64() > Some(100), "{summary}");
    let rendered_base = &rendered[0].1;
    assert!(rendered_base.contains("ReadWriteMany"));
}
