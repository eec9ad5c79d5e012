//! `aishell image build`: the Docker backend's task image, built from this
//! very binary (FROM scratch, nothing pulled). See README "Docker backend".

use std::path::PathBuf;

use aishell_backend_docker::image::{ImageRecipe, build, image_id};
use aishell_backend_docker::{DEFAULT_IMAGE, DockerBackend, DockerBackendConfig};
use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build the task image: this binary, its shared libraries (ldd) and busybox.
    Build {
        /// Tag to build.
        #[arg(long, default_value = DEFAULT_IMAGE)]
        tag: String,
        /// aishell binary to put in the image [default: the running one].
        #[arg(long)]
        binary: Option<PathBuf>,
        /// busybox binary for the shell and core utilities (Debian: busybox-static).
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Engine socket, unix:///path [default: DOCKER_HOST, then /var/run/docker.sock].
        #[arg(long, env = "DOCKER_HOST")]
        docker_host: Option<String>,
    },
}

pub async fn run(args: ImageArgs) -> anyhow::Result<()> {
    match args.command {
        ImageCommand::Build {
            tag,
            binary,
            busybox,
            docker_host,
        } => {
            let binary = match binary {
                Some(b) => b,
                None => std::env::current_exe().context("cannot locate the aishell binary")?,
            };
            let mut cfg = DockerBackendConfig::new("image-build", "/nonexistent");
            cfg.docker_host = docker_host;
            // Sending a large debug binary as context takes a while.
            cfg.api_timeout = std::time::Duration::from_secs(600);
            let backend = DockerBackend::new(cfg);
            let recipe = ImageRecipe {
                tag: tag.clone(),
                binary,
                busybox,
            };
            let before = image_id(&backend, &tag).await?;
            let log = build(&backend, &recipe).await?;
            eprint!("{log}");
            let after = image_id(&backend, &tag).await?;
            println!("built {tag}");
            if let Some(previous) = before.filter(|b| Some(b) != after.as_ref()) {
                eprintln!(
                    "aishell: replaced the tag {tag}: it named {} before (that image keeps any other tags it has); pass --tag to build under another name",
                    short_id(&previous)
                );
            }
            Ok(())
        }
    }
}

/// `sha256:0123456789ab` (the form `docker images` shows).
fn short_id(id: &str) -> &str {
    let end = id.find(':').map_or(0, |i| i + 1) + 12;
    id.get(..end).unwrap_or(id)
}
