//! `switchboard keys …`: key administration on the configured store (SPEC §1).
//!
//! Secrets are printed once, by `create`, and never stored or printed again.

use std::process::ExitCode;

use clap::Subcommand;
use switchboard::accounts::validate_new_key;
use switchboard::clock::{format_rfc3339, parse_rfc3339};
use switchboard::config::Config;
use switchboard::keys::LimitReset;
use switchboard::money::Money;
use switchboard::store::{
    credits_after_top_up, hash_secret, new_secret, KeyPatch, NewKey, PeriodUsage, StoredKey,
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
        /// The period --limit-usd applies to: daily, weekly (Monday to Sunday) or
        /// monthly, UTC (default: the key's lifetime).
        #[arg(long)]
        limit_reset: Option<LimitReset>,
        /// When the key stops working, RFC 3339 (e.g. 2026-01-31T00:00:00Z).
        #[arg(long, value_parser = parse_rfc3339)]
        expires_at: Option<u64>,
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

fn line(k: &StoredKey, usage: PeriodUsage) -> String {
    let r = &k.record;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    format!(
        "{}\t{}\tcredits={}\tusage={}\tlimit={}\tlimit_reset={}\tusage_daily={}\tusage_weekly={}\tusage_monthly={}\texpires_at={}\trpm={}\ttokens_per_day={}\tmodels={}{}",
        r.id,
        r.name,
        k.credits,
        k.spent,
        opt(r.limit.map(|l| l.to_string())),
        opt(r.limit_reset.map(|p| p.to_string())),
        usage.daily,
        usage.weekly,
        usage.monthly,
        opt(r.expires_at.map(format_rfc3339)),
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
            limit_reset,
            expires_at,
        } => {
            let new = NewKey {
                name,
                credits,
                limit: limit_usd,
                rpm,
                tokens_per_day,
                models,
                limit_reset,
                expires_at,
            };
            if let Err(m) = validate_new_key(&new) {
                eprintln!("switchboard: {m}");
                return ExitCode::from(1);
            }
            let secret = new_secret();
            match store.create(hash_secret(&secret), new) {
                Ok(k) => {
                    println!("{}", line(&k, PeriodUsage::default()));
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
                    match ledger.usage(&k.record.id) {
                        Ok(usage) => println!("{}", line(k, usage)),
                        Err(e) => return runtime(e),
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => runtime(e),
        },
        KeysCommand::Show { id } => match store.get(&id) {
            Ok(Some(k)) => {
                let usage = match ledger.usage(&id) {
                    Ok(u) => u,
                    Err(e) => return runtime(e),
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&k.view_with(usage)).unwrap_or_default()
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
                    let usage = ledger.usage(&id).unwrap_or_default();
                    println!("{}", line(&k, usage));
                    ExitCode::SUCCESS
                }
                Ok(None) => not_found(&id),
                Err(e) => runtime(e),
            }
        }
    }
}
