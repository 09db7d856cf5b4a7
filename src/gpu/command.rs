//! The `kvfs gpu` subcommands: argument structs and what each command does.
//! Output goes to the writer the CLI passes in.

use std::io::Write;

use super::GpuError;
use super::bench::{self, BenchArgs};
use super::cuda;

#[derive(Debug, clap::Subcommand)]
pub enum GpuCommand {
    /// Print the CUDA driver version and the GPUs found; exit code 2 when
    /// there is no driver or no GPU.
    Check {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Store and load a synthetic KV cache through kvfs (fuse, zerocopy,
    /// gds paths), verify every byte, print GB/s next to raw cuMemcpy.
    Bench(Box<BenchArgs>),
}

pub fn run(cmd: GpuCommand, out: &mut dyn Write) -> Result<(), GpuError> {
    match cmd {
        GpuCommand::Check { json } => check(json, out),
        GpuCommand::Bench(args) => bench::run(&args, out).map(drop),
    }
}

fn check(json: bool, out: &mut dyn Write) -> Result<(), GpuError> {
    cuda::init()?;
    let version = cuda::driver_version()?;
    let devices = cuda::devices()?;
    if devices.is_empty() {
        return Err(GpuError::NoGpu("the CUDA driver reports no devices".into()));
    }
    let w = |e: std::io::Error| GpuError::Io {
        op: "write",
        path: "stdout".into(),
        source: e,
    };
    if json {
        let doc = serde_json::json!({ "driver_version": version, "devices": devices });
        writeln!(out, "{doc}").map_err(w)?;
        return Ok(());
    }
    writeln!(
        out,
        "CUDA driver {}.{} ({version})",
        version / 1000,
        (version % 1000) / 10
    )
    .map_err(w)?;
    for d in devices {
        writeln!(
            out,
            "GPU {}: {}, {:.1} GiB, compute capability {}.{}, PCI bus {:#04x}",
            d.ordinal,
            d.name,
            d.total_memory as f64 / (1u64 << 30) as f64,
            d.compute_capability.0,
            d.compute_capability.1,
            d.pci_bus_id
        )
        .map_err(w)?;
    }
    Ok(())
}
