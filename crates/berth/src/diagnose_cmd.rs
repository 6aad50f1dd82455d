//! `berth diagnose`: the command line of the `diagnose` crate.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
#[command(
    after_help = "Exit codes: 0 the pull works; 2 bad arguments; 10 network (name resolution, \
TCP); 11 TLS; 12 authentication or permission; 13 repository or tag not found; 14 platform missing \
from the index; 15 content (manifest or blob missing or corrupt); 16 refused by the registry (rate \
limit, quota, upstream down)."
)]
pub struct DiagnoseArgs {
    /// The image: host[:port]/repository[:tag|@digest] (http:// or https:// first to choose).
    pub image: String,
    /// Credentials USER:PASS (sent only to the registry or the token realm it names).
    #[arg(long, conflicts_with_all = ["creds_file", "docker_config"])]
    pub creds: Option<String>,
    /// A file holding USER:PASS.
    #[arg(long)]
    pub creds_file: Option<PathBuf>,
    /// A docker config directory: its config.json `auths` entry for the host.
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
    /// The platform wanted from an index, os/arch[/variant]. [default: this machine's]
    #[arg(long)]
    pub platform: Option<String>,
    /// One JSON document instead of the checklist.
    #[arg(long)]
    pub json: bool,
    /// Limit of each network step, e.g. 10s or 500ms.
    #[arg(long, default_value = "10s")]
    pub timeout: String,
    /// HOST:PORT:ADDR: use ADDR for HOST:PORT instead of DNS (as curl's --resolve).
    #[arg(long)]
    pub resolve: Vec<String>,
    /// Speak plain HTTP, as a client that lists the registry as insecure.
    #[arg(long)]
    pub plain_http: bool,
    /// Extra CA certificates (PEM) to trust.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Download every blob and verify its digest.
    #[arg(long)]
    pub deep: bool,
}

fn options(a: &DiagnoseArgs) -> Result<diagnose::Options, String> {
    let mut o = diagnose::Options::new(&a.image);
    o.timeout = humantime(&a.timeout)?;
    o.platform = a.platform.clone();
    o.plain_http = a.plain_http;
    o.ca_file = a.ca_file.clone();
    o.deep = a.deep;
    o.progress = a.deep && !a.json && std::io::stderr().is_terminal();
    for r in &a.resolve {
        o.resolve.push(diagnose::parse_resolve(r)?);
    }
    o.creds = if let Some(c) = &a.creds {
        Some(diagnose::parse_creds(c).map_err(|e| e.to_string())?)
    } else if let Some(f) = &a.creds_file {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        Some(diagnose::parse_creds(text.trim()).map_err(|e| e.to_string())?)
    } else if let Some(d) = &a.docker_config {
        let img = diagnose::Image::parse(&a.image, a.plain_http).map_err(|e| e.to_string())?;
        Some(diagnose::docker_config(d, &img.authority()).map_err(|e| e.to_string())?)
    } else {
        None
    };
    Ok(o)
}

/// Runs `f` on a runtime of this thread: both commands are a few
/// requests one after the other. `Err` (said on stderr) when no runtime
/// can be made.
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, ()> {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => Ok(rt.block_on(f)),
        Err(e) => {
            eprintln!("berth: error: cannot start the async runtime: {e}");
            Err(())
        }
    }
}

fn humantime(s: &str) -> Result<std::time::Duration, String> {
    observe::time::parse_duration(s).map_err(|e| format!("--timeout {s:?}: {e}"))
}

pub fn run(a: DiagnoseArgs) -> ExitCode {
    let opts = match options(&a) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("berth: error: {e}");
            return ExitCode::from(2);
        }
    };
    let Ok(report) = block_on(diagnose::run(&opts)) else {
        return ExitCode::FAILURE;
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", report.human());
    }
    ExitCode::from(report.exit_code)
}

#[derive(clap::Args)]
#[command(
    after_help = "Exit codes: 0 verified; 1 not verified (the reason is printed); 2 bad arguments; \
3 the registry could not be read."
)]
pub struct VerifyArgs {
    /// The image: host[:port]/repository[:tag|@digest] (http:// or https:// first to choose).
    pub image: String,
    /// A trusted public key (PEM, e.g. cosign.pub); repeat for several.
    #[arg(long = "key", required = true)]
    pub keys: Vec<PathBuf>,
    /// Distinct trusted keys that must have signed.
    #[arg(long, default_value_t = 1)]
    pub threshold: usize,
    /// Credentials USER:PASS (sent only to the registry or the token realm it names).
    #[arg(long)]
    pub creds: Option<String>,
    /// One JSON document instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Limit of each request, e.g. 10s.
    #[arg(long, default_value = "10s")]
    pub timeout: String,
    /// Speak plain HTTP, as a client that lists the registry as insecure.
    #[arg(long)]
    pub plain_http: bool,
    /// Extra CA certificates (PEM) to trust.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
}

fn verify_inputs(a: &VerifyArgs) -> Result<(diagnose::Options, Vec<signature::PublicKey>), String> {
    let mut o = diagnose::Options::new(&a.image);
    o.timeout = humantime(&a.timeout)?;
    o.plain_http = a.plain_http;
    o.ca_file = a.ca_file.clone();
    o.creds = a
        .creds
        .as_deref()
        .map(|c| diagnose::parse_creds(c).map_err(|e| e.to_string()))
        .transpose()?;
    let mut keys = Vec::new();
    for k in &a.keys {
        let pem = std::fs::read_to_string(k).map_err(|e| format!("--key {}: {e}", k.display()))?;
        keys.push(signature::PublicKey::from_pem(&pem).map_err(|e| format!("--key {}: {e}", k.display()))?);
    }
    if a.threshold == 0 || a.threshold > keys.len() {
        return Err(format!(
            "--threshold {} needs between 1 and the {} key(s) given",
            a.threshold,
            keys.len()
        ));
    }
    Ok((o, keys))
}

pub fn verify(a: VerifyArgs) -> ExitCode {
    let (opts, keys) = match verify_inputs(&a) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("berth: error: {e}");
            return ExitCode::from(2);
        }
    };
    let Ok(result) = block_on(diagnose::verify::run(&opts, keys, a.threshold)) else {
        return ExitCode::from(3);
    };
    match result {
        Ok(r) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print!("{}", r.human());
            }
            ExitCode::from(if r.allowed { 0 } else { 1 })
        }
        Err(diagnose::verify::VerifyError::Usage(e)) => {
            eprintln!("berth: error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("berth: error: {e}");
            ExitCode::from(3)
        }
    }
}
