//! The test-only stand-in API server as a process, for `aishell bench`
//! against it: `stand_in KUBECONFIG_OUT WORKSPACES_DIR` serves on a loopback
//! port, writes a kubeconfig for it, and runs pods as Docker containers
//! until Ctrl-C, when it removes them.

use std::collections::HashMap;
use std::path::PathBuf;

use aishell_backend_kubernetes::stand_in::{DockerRuntime, StandIn};

#[tokio::main]
async fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (Some(kubeconfig), Some(workspaces)) = (args.next(), args.next()) else {
        return Err("usage: stand_in KUBECONFIG_OUT WORKSPACES_DIR".into());
    };
    let claims = HashMap::from([("aishell-workspaces".to_string(), PathBuf::from(workspaces))]);
    let stand_in = StandIn::new("aishell", Some(DockerRuntime::local(claims)?));
    let url = stand_in.serve().await.map_err(|e| e.to_string())?;
    std::fs::write(&kubeconfig, stand_in.kubeconfig(&url)).map_err(|e| e.to_string())?;
    println!("stand-in API server at {url}; kubeconfig {kubeconfig}; Ctrl-C stops");
    let _ = tokio::signal::ctrl_c().await;
    stand_in.remove_containers().await;
    Ok(())
}
