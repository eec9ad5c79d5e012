//! `aishell-sandbox`: only the roles that run inside a sandbox (runner and
//! built-in agents), for the process backend; see `sandbox_roles.rs` for
//! why it is a binary of its own.

#[allow(dead_code)] // the gateway's console and file logs are not for sandboxes
mod logging;
mod prefault;
mod sandbox_roles;

use std::process::ExitCode;

use sandbox_roles::Role;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let role = match args.next().as_deref() {
        Some("runner") => Role::Runner,
        Some("agent") => {
            let mut kind = None;
            let mut await_init = false;
            for arg in args {
                match arg.as_str() {
                    "--await-init" => await_init = true,
                    other if kind.is_none() && !other.starts_with('-') => {
                        kind = Some(other.to_string())
                    }
                    other => return usage(&format!("unexpected argument `{other}`")),
                }
            }
            let Some(kind) = kind else {
                return usage("agent needs a kind (echo, shell, llm or claude)");
            };
            Role::Agent { kind, await_init }
        }
        Some("--version") => {
            println!("aishell-sandbox {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        other => {
            return usage(&format!("unknown role `{}`", other.unwrap_or_default()));
        }
    };
    sandbox_roles::run(role)
}

fn usage(problem: &str) -> ExitCode {
    eprintln!(
        "aishell-sandbox: {problem}\nusage: aishell-sandbox runner | aishell-sandbox agent KIND [--await-init]\n(started by the process backend, not by hand)"
    );
    ExitCode::from(2)
}
