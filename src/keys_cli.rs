//! `switchboard keys …`: key administration on the configured store (SPEC §1).
//!
//! Secrets are printed once, by `create`, and never stored or printed again.

use std::process::ExitCode;

use clap::Subcommand;
use switchboard::accounts::validate_new_key;
use switchboard::config::Config;
use switchboard::money::Money;
use switchboard::store::{
    credits_after_top_up, hash_secret, new_secret, KeyPatch, NewKey, StoredKey,
};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret (once).
    Create {
        /// Credits granted, USD (e.g. 5 or 0.25).
        #[arg(long)]
        credits: Money,
        /// Display name.
        #[arg(long, default_value = "key")]
        name: String,
        /// Lifetime spending limit, USD.
        #[arg(long)]
        limit_usd: Option<Money>,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u32>,
        /// Tokens per UTC day.
        #[arg(long)]
        tokens_per_day: Option<u64>,
        /// Allow-list of model globs, comma-separated (e.g. "openai/*,mock/echo").
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
    },
    /// List every key (never a secret).
    List,
    /// Show one key.
    Show {
        /// Key id (`key_…`).
        id: String,
    },
    /// Add credits to a key.
    TopUp {
        /// Key id (`key_…`).
        id: String,
        /// USD to add (more than 0).
        usd: Money,
    },
    /// Disable a key (its requests get 403 within seconds).
    Disable {
        /// Key id (`key_…`).
        id: String,
    },
}

fn line(k: &StoredKey) -> String {
    let r = &k.record;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    format!(
        "{}\t{}\tcredits={}\tusage={}\tlimit={}\trpm={}\ttokens_per_day={}\tmodels={}{}",
        r.id,
        r.name,
        k.credits,
        k.spent,
        opt(r.limit.map(|l| l.to_string())),
        opt(r.rpm.map(|v| v.to_string())),
        opt(r.tokens_per_day.map(|v| v.to_string())),
        opt(r.models.as_ref().map(|m| m.join(","))),
        if r.disabled { "\tDISABLED" } else { "" }
    )
}

fn not_found(id: &str) -> ExitCode {
    eprintln!("switchboard: no key `{id}` in the store (`switchboard keys list` shows the ids)");
    ExitCode::from(1)
}

fn runtime(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("switchboard: {e}");
    ExitCode::from(2)
}

pub fn run(config: &Config, command: KeysCommand) -> ExitCode {
    // SQLite or PostgreSQL, as `[store].url` says.
    let opened = match switchboard::store::open(&config.store) {
        Ok(s) => s,
        Err(e) => return runtime(e),
    };
    if let Err(e) = opened.bootstrap(&config.keys) {
        return runtime(e);
    }
    let (store, ledger) = (opened.keys(), opened.ledger());
    match command {
        KeysCommand::Create {
            credits,
            name,
            limit_usd,
            rpm,
            tokens_per_day,
            models,
        } => {
            let new = NewKey {
                name,
                credits,
                limit: limit_usd,
                rpm,
                tokens_per_day,
                models,
            };
            if let Err(m) = validate_new_key(&new) {
                eprintln!("switchboard: {m}");
                return ExitCode::from(1);
            }
            let secret = new_secret();
            match store.create(hash_secret(&secret), new) {
                Ok(k) => {
                    println!("{}", line(&k));
                    println!("secret: {secret}");
                    eprintln!("(the secret is shown only now; it is stored hashed)");
                    ExitCode::SUCCESS
                }
                Err(e) => runtime(e),
            }
        }
        KeysCommand::List => match store.list() {
            Ok(keys) => {
                for k in &keys {
                    println!("{}", line(k));
                }
                ExitCode::SUCCESS
            }
            Err(e) => runtime(e),
        },
        KeysCommand::Show { id } => match store.get(&id) {
            Ok(Some(k)) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&k.view()).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Ok(None) => not_found(&id),
            Err(e) => runtime(e),
        },
        KeysCommand::TopUp { id, usd } => {
            // Checked before writing (and again in the transaction that writes it).
            let credits = match store.get(&id) {
                Ok(Some(k)) => k.credits,
                Ok(None) => return not_found(&id),
                Err(e) => return runtime(e),
            };
            if let Err(m) = credits_after_top_up(credits, usd) {
                eprintln!("switchboard: cannot top up `{id}`: {m}");
                return ExitCode::from(1);
            }
            match ledger.top_up(&id, usd) {
                Ok(Some(b)) => {
                    println!(
                        "{id}: credits={} usage={} remaining={}",
                        b.credits,
                        b.spent,
                        b.credits - b.spent
                    );
                    ExitCode::SUCCESS
                }
                Ok(None) => not_found(&id),
                Err(e) => runtime(e),
            }
        }
        KeysCommand::Disable { id } => {
            let patch = KeyPatch {
                disabled: Some(true),
                ..KeyPatch::default()
            };
            match store.update(&id, &patch) {
                Ok(Some(k)) => {
                    println!("{}", line(&k));
                    ExitCode::SUCCESS
                }
                Ok(None) => not_found(&id),
                Err(e) => runtime(e),
            }
        }
    }
}
