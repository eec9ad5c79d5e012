//! `deploy/aws` checked without AWS: every file parses as HCL
//! (python-hcl2), checkov reports no failed check, and the gateway's IAM
//! policy grants exactly the ECS actions this crate's code calls.
//!
//! Needs `python3` with `hcl2` and `checkov` (`.ci/run` installs both,
//! pinned); runs with the `terraform-checks` feature.
#![cfg(feature = "terraform-checks")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use aishell_backend_ecs::REQUIRED_ACTIONS;

fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/aws")
}

fn tf_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(module_dir())
        .expect("deploy/aws exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tf"))
        .collect();
    files.sort();
    files
}

/// Every `.tf` file parsed by python-hcl2, as JSON (file name → body).
fn parsed() -> serde_json::Value {
    const SCRIPT: &str = "import hcl2, json, sys\nprint(json.dumps({f: hcl2.load(open(f)) for f in sys.argv[1:]}, default=str))";
    let out = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .args(tf_files())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "deploy/aws does not parse (or python-hcl2 is missing: pip install python-hcl2):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    normalise(&serde_json::from_slice(&out.stdout).expect("json from hcl2"))
}

/// python-hcl2 8 quotes keys and strings (`"\"ecs:RunTask\""`); the older
/// fork checkov installs under the same module name wraps attribute values in
/// lists instead. Both become plain keys and strings here.
fn normalise(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(s.trim_matches('"').to_string()),
        Value::Array(items) => Value::Array(items.iter().map(normalise).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.trim_matches('"').to_string(), normalise(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Every string in a value, lists flattened.
fn strings(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) => items.iter().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

/// The ECS actions this crate's code calls: each SDK operation on the
/// client (`.client.run_task()` → `ecs:RunTask`), plus `ecs:TagResource`
/// when RunTask carries tags.
fn actions_in_code() -> BTreeSet<String> {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("src/lib.rs");
    let code = src.split("#[cfg(test)]").next().unwrap_or_default();
    let compact: String = code.split_whitespace().collect();
    let mut actions = BTreeSet::new();
    for piece in compact.split(".client.").skip(1) {
        let op: String = piece
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !piece[op.len()..].starts_with("()") {
            continue;
        }
        let pascal: String = op
            .split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect();
        actions.insert(format!("ecs:{pascal}"));
    }
    if compact.contains(".run_task()") && compact.contains(".tags(tag(") {
        actions.insert("ecs:TagResource".into());
    }
    actions
}

#[test]
fn the_gateway_policy_grants_exactly_the_ecs_actions_the_backend_calls() {
    let code = actions_in_code();
    assert_eq!(
        code,
        REQUIRED_ACTIONS.iter().map(|s| s.to_string()).collect(),
        "the permission check's list and the code agree"
    );
    let files = parsed();
    let iam = files
        .as_object()
        .unwrap()
        .iter()
        .find(|(f, _)| f.ends_with("iam.tf"))
        .map(|(_, body)| body)
        .expect("iam.tf");
    let mut granted = BTreeSet::new();
    let mut resources_star = Vec::new();
    for data in iam["data"].as_array().unwrap() {
        let Some(docs) = data.get("aws_iam_policy_document") else {
            continue;
        };
        let Some(doc) = docs.get("gateway_ecs") else {
            continue;
        };
        for st in doc["statement"].as_array().unwrap() {
            let actions = strings(&st["actions"]);
            for a in &actions {
                if a.starts_with("ecs:") {
                    granted.insert(a.clone());
                }
            }
            let resources = strings(&st["resources"]);
            if resources.iter().any(|r| r == "*") {
                resources_star.push(actions.clone());
            }
            if actions.iter().any(|a| a.starts_with("ecs:")) {
                assert!(
                    st.get("condition").is_some(),
                    "every ECS grant is limited to the cluster or to launches: {st}"
                );
            }
        }
    }
    assert_eq!(
        granted, code,
        "the gateway's task role grants exactly what the code calls"
    );
    assert!(
        resources_star.is_empty(),
        "no grant on every resource: {resources_star:?}"
    );
}

#[test]
fn sandboxes_get_no_aws_permissions_but_their_workspaces() {
    let files = parsed();
    let iam = files
        .as_object()
        .unwrap()
        .iter()
        .find(|(f, _)| f.ends_with("iam.tf"))
        .map(|(_, body)| body.clone())
        .unwrap();
    let text = iam.to_string();
    // The sandbox role's only policy is the EFS mount through its access point.
    let attached: Vec<String> = iam["resource"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r.get("aws_iam_role_policy"))
        .flat_map(|p| p.as_object().unwrap().values().cloned())
        .filter(|p| {
            strings(&p["role"])
                .concat()
                .contains("aws_iam_role.sandbox")
        })
        .flat_map(|p| strings(&p["policy"]))
        .collect();
    assert_eq!(
        attached,
        ["${data.aws_iam_policy_document.sandbox_efs.json}"],
        "{text}"
    );
}

#[test]
fn checkov_reports_no_failed_check() {
    // CHECKOV, else the `checkov` on PATH (CI: a virtualenv of its own, as
    // its hcl2 fork would replace python-hcl2's module of the same name).
    let checkov = std::env::var("CHECKOV").unwrap_or_else(|_| "checkov".into());
    let out = Command::new(checkov)
        .args([
            "--quiet",
            "--compact",
            "--skip-download",
            "--framework",
            "terraform",
            "-d",
        ])
        .arg(module_dir())
        .output()
        .expect("checkov (pip install checkov)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "checkov found failed checks in deploy/aws:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
