//! `blockmover bench`: measures syncs between separate agent processes over loopback TLS (placeholder).

/// `blockmover bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Volume size in MiB.
    #[arg(long, default_value_t = 2048)]
    pub size_mib: u64,
}

/// Runs the benchmark.
pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("blockmover bench is not implemented yet")
}
