//! `aishell bench` measures something real: every sample answered, numbers
//! present and positive.

use std::process::Command;

#[test]
fn bench_spawns_a_gateway_and_reports_latencies() {
    let out = Command::new(env!("CARGO_BIN_EXE_aishell"))
        .args([
            "bench",
            "--concurrency",
            "1,3",
            "--rounds",
            "1",
            "--echo-roundtrips",
            "20",
            "--format",
            "json",
            "--timeout",
            "20",
        ])
        .output()
        .expect("run bench");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench prints JSON");
    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (level, n) in levels.iter().zip([1u64, 3]) {
        let total: u64 = ["warm", "cold", "unknown"]
            .iter()
            .filter_map(|s| level[s]["n"].as_u64())
            .sum();
        let failures: u64 = ["warm", "cold", "unknown"]
            .iter()
            .filter_map(|s| level[s]["failures"].as_u64())
            .sum();
        assert_eq!((total, failures), (n, 0), "{level}");
        let some = ["warm", "cold"]
            .iter()
            .find(|s| !level[**s].is_null())
            .unwrap();
        assert!(level[*some]["first_event_ms"]["p50"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(report["roundtrip"]["n"], 20);
    assert!(report["roundtrip"]["per_second"].as_f64().unwrap() > 0.0);
    assert!(report["gateway_rss_mib"].as_f64().unwrap() > 1.0);
    assert!(report["first_error"].is_null());
}
