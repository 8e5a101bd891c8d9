//! `hearth clients add|list|remove`: the SMART Backend Services client registry of a data
//! directory. A running server reads registrations per token request, so changes take effect
//! at once (SQLite in WAL mode lets this command write beside a running server).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use hearth_fhir::instant::{format_instant, now_micros};
use hearth_server::auth::{jwks, scopes};
use hearth_store::Backend;
use hearth_store::clients::ClientRecord;

#[derive(Args, Debug)]
pub struct ClientsArgs {
    /// Data directory of the server.
    #[arg(
        long,
        env = "HEARTH_DATA",
        default_value = "./hearth-data",
        global = true
    )]
    data: PathBuf,
    /// The server's PostgreSQL database (postgres://…), when it runs on one.
    #[arg(long, env = "HEARTH_DATABASE", global = true)]
    database: Option<String>,
    #[command(subcommand)]
    command: ClientsCommand,
}

#[derive(Subcommand, Debug)]
enum ClientsCommand {
    /// Register a client (or replace its registration) with its public keys.
    Add(AddArgs),
    /// List the registered clients.
    List,
    /// Remove a client; its tokens stop working when they expire (at most 5 minutes).
    Remove {
        /// The client id.
        #[arg(long)]
        id: String,
    },
}

#[derive(Args, Debug)]
struct AddArgs {
    /// The client id: the `iss` and `sub` of its assertions.
    #[arg(long)]
    id: String,
    /// Where the client publishes its public keys (preferred: allows key rotation).
    #[arg(
        long,
        conflicts_with = "jwks_file",
        required_unless_present = "jwks_file"
    )]
    jwks_url: Option<String>,
    /// A file with the client's public keys as a JWKS; stored as it is now.
    #[arg(long)]
    jwks_file: Option<PathBuf>,
    /// The most the client may be granted, e.g. "system/*.rs" or "system/Patient.read"
    /// (repeatable, or space-separated; default: any read scope).
    #[arg(long = "scope")]
    scopes: Vec<String>,
}

pub async fn run(args: ClientsArgs) -> anyhow::Result<ExitCode> {
    let store = crate::cli::open_store(args.database.as_deref(), &args.data).await?;
    let result = match args.command {
        ClientsCommand::Add(add) => add_client(store.as_ref(), add).await,
        ClientsCommand::List => list_clients(store.as_ref()).await,
        ClientsCommand::Remove { id } => {
            if store.remove_client(&id).await? {
                println!("removed client {id}");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("no client {id} is registered");
                Ok(ExitCode::FAILURE)
            }
        }
    };
    store.close().await.context("closing the store")?;
    result
}

async fn add_client(store: &dyn Backend, args: AddArgs) -> anyhow::Result<ExitCode> {
    let id = args.id.trim();
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic()) {
        bail!("--id must be 1 to 128 printable characters without spaces");
    }
    let jwks = match &args.jwks_file {
        Some(path) => {
            let text =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            check_public_only(&text)?;
            let usable = jwks::check_client_jwks(&text)
                .with_context(|| format!("{} is not a usable JWKS", path.display()))?;
            println!("{usable} usable public key(s) in {}", path.display());
            let compact: serde_json::Value = serde_json::from_slice(&text)?;
            Some(compact.to_string())
        }
        None => None,
    };
    if let Some(url) = &args.jwks_url {
        let parsed = reqwest::Url::parse(url).with_context(|| format!("--jwks-url '{url}'"))?;
        match parsed.scheme() {
            "https" => {}
            "http" => {
                eprintln!("warning: {url} is not HTTPS; anyone on the path can swap the keys")
            }
            other => bail!("--jwks-url must be http(s), not {other}"),
        }
    }
    let scope = if args.scopes.is_empty() {
        None
    } else {
        let joined = args.scopes.join(" ");
        scopes::check_registered(&joined).with_context(|| format!("--scope '{joined}'"))?;
        Some(joined)
    };
    let replaced = store
        .put_client(ClientRecord {
            id: id.to_owned(),
            jwks_url: args.jwks_url.clone(),
            jwks,
            scope: scope.clone(),
            created_at: now_micros(),
        })
        .await?;
    println!(
        "{} client {id} (scope: {})",
        if replaced { "replaced" } else { "registered" },
        scope.as_deref().unwrap_or("any read scope")
    );
    Ok(ExitCode::SUCCESS)
}

/// A JWKS for registration holds public keys only: a private key here would be a leak.
fn check_public_only(text: &[u8]) -> anyhow::Result<()> {
    let value: serde_json::Value = serde_json::from_slice(text).context("the JWKS is not JSON")?;
    let private = value["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|key| key.get("d").is_some() || key.get("p").is_some());
    if private {
        bail!("the JWKS holds private key material; register the public keys only");
    }
    Ok(())
}

async fn list_clients(store: &dyn Backend) -> anyhow::Result<ExitCode> {
    let clients = store.clients().await?;
    if clients.is_empty() {
        println!("no clients registered");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<32} {:<28} {:<48} keys", "id", "registered", "scope");
    for client in clients {
        let keys = match (&client.jwks_url, &client.jwks) {
            (Some(url), _) => url.clone(),
            (None, Some(jwks)) => format!(
                "inline JWKS ({} keys)",
                jwks::parse_jwks(jwks.as_bytes()).map_or(0, |k| k.len())
            ),
            (None, None) => "none".into(),
        };
        println!(
            "{:<32} {:<28} {:<48} {keys}",
            client.id,
            format_instant(client.created_at),
            client.scope.as_deref().unwrap_or("(any read scope)")
        );
    }
    Ok(ExitCode::SUCCESS)
}
