//! `switchboard keys …`: key administration on the configured store (SPEC §1).
//!
//! Secrets are printed once, by `create` and `rotate`, and never stored or printed
//! again.

use std::process::ExitCode;

use clap::Subcommand;
use switchboard::accounts::{rotate_key, validate_new_key};
use switchboard::clock::{format_rfc3339, parse_rfc3339};
use switchboard::config::Config;
use switchboard::keys::{check_labels, parse_label, LimitReset};
use switchboard::money::Money;
use switchboard::store::{
    credits_after_top_up, hash_secret, new_secret, now_unix, KeyPatch, KeyStore, NewKey,
    PeriodUsage, StoredKey,
};

/// `println!` that ends the command when stdout is closed (`keys list | head`)
/// instead of panicking: quietly, with the status a shell reports for a command ended
/// by SIGPIPE (141), as other command-line tools end. Never 0: a `create` or `rotate`
/// whose secret could not be printed did not succeed for its caller.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("switchboard: cannot write to stdout: {e}");
                std::process::exit(1);
            }
            std::process::exit(141);
        }
    }};
}

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
        /// A free-form tag, k=v (repeat for more; recorded with each request).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List the keys (never a secret); deleted ones only with --all.
    List {
        /// Deleted keys too.
        #[arg(long)]
        all: bool,
    },
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
    /// Enable a disabled key again.
    Enable {
        /// Key id (`key_…`).
        id: String,
    },
    /// Delete a key: it stops working (401 "key deleted"); its ledger rows,
    /// generations and balance stay for the books (`show` and `list --all` show it).
    Delete {
        /// Key id (`key_…`).
        id: String,
    },
    /// Give a key a new secret (printed once): same id, balance, limits and usage.
    Rotate {
        /// Key id (`key_…`).
        id: String,
        /// How long the old secret keeps working, seconds (0: it stops at once).
        #[arg(long, default_value_t = 0)]
        grace_secs: u64,
    },
    /// Change a key's name or labels.
    Update {
        /// Key id (`key_…`).
        id: String,
        /// New display name.
        #[arg(long)]
        name: Option<String>,
        /// Add or replace a label, k=v (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Remove the label with this key (repeatable).
        #[arg(long = "unlabel")]
        unlabels: Vec<String>,
    },
}

fn line(k: &StoredKey, usage: PeriodUsage) -> String {
    let r = &k.record;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    format!(
        "{}\t{}\tcredits={}\tusage={}\tlimit={}\tlimit_reset={}\tusage_daily={}\tusage_weekly={}\tusage_monthly={}\texpires_at={}\trpm={}\ttokens_per_day={}\tmodels={}\tlabels={}{}{}",
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
        if r.labels.is_empty() {
            "-".into()
        } else {
            serde_json::to_string(&r.labels).unwrap_or_default()
        },
        if r.disabled { "\tDISABLED" } else { "" },
        if r.deleted() { "\tDELETED" } else { "" }
    )
}

fn not_found(id: &str) -> ExitCode {
    eprintln!("switchboard: no key `{id}` in the store (`switchboard keys list` shows the ids)");
    ExitCode::from(1)
}

fn usage_error(m: impl std::fmt::Display) -> ExitCode {
    eprintln!("switchboard: {m}");
    ExitCode::from(1)
}

/// Applies `patch` to key `id` and prints its line; a deleted key is refused.
fn change(
    store: &dyn KeyStore,
    ledger: &dyn switchboard::store::Ledger,
    id: &str,
    patch: &KeyPatch,
) -> ExitCode {
    match store.get(id) {
        Ok(Some(k)) if k.record.deleted() => {
            return usage_error(format!(
                "key `{id}` is deleted: it cannot be changed (create a new key)"
            ))
        }
        Ok(Some(_)) => {}
        Ok(None) => return not_found(id),
        Err(e) => return runtime(e),
    }
    match store.update(id, patch) {
        Ok(Some(k)) => {
            let usage = ledger.usage(id).unwrap_or_default();
            out!("{}", line(&k, usage));
            ExitCode::SUCCESS
        }
        Ok(None) => not_found(id),
        Err(e) => runtime(e),
    }
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
            labels,
        } => {
            let new = NewKey {
                labels: labels.into_iter().collect(),
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
                    out!("{}", line(&k, PeriodUsage::default()));
                    out!("secret: {secret}");
                    eprintln!("(the secret is shown only now; it is stored hashed)");
                    ExitCode::SUCCESS
                }
                Err(e) => runtime(e),
            }
        }
        KeysCommand::List { all } => match store.list() {
            Ok(keys) => {
                for k in keys.iter().filter(|k| all || !k.record.deleted()) {
                    match ledger.usage(&k.record.id) {
                        Ok(usage) => out!("{}", line(k, usage)),
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
                out!(
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
                    out!(
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
            change(&*store, &*ledger, &id, &patch)
        }
        KeysCommand::Enable { id } => {
            let patch = KeyPatch {
                disabled: Some(false),
                ..KeyPatch::default()
            };
            change(&*store, &*ledger, &id, &patch)
        }
        KeysCommand::Delete { id } => {
            let patch = KeyPatch {
                delete_at: Some(now_unix()),
                ..KeyPatch::default()
            };
            match store.update(&id, &patch) {
                Ok(Some(k)) => {
                    let usage = ledger.usage(&id).unwrap_or_default();
                    out!("{}", line(&k, usage));
                    eprintln!("(deleted: its secret is refused; its ledger rows and balance stay)");
                    ExitCode::SUCCESS
                }
                Ok(None) => not_found(&id),
                Err(e) => runtime(e),
            }
        }
        KeysCommand::Rotate { id, grace_secs } => {
            match rotate_key(&*store, &id, grace_secs, now_unix()) {
                Ok(Some((k, secret))) => {
                    let usage = ledger.usage(&id).unwrap_or_default();
                    out!("{}", line(&k, usage));
                    out!("secret: {secret}");
                    if grace_secs > 0 {
                        eprintln!("(the old secret keeps working for {grace_secs} s; the new one is shown only now)");
                    } else {
                        eprintln!(
                            "(the old secret stopped working; the new one is shown only now)"
                        );
                    }
                    ExitCode::SUCCESS
                }
                Ok(None) => not_found(&id),
                Err(e) if e.code() == "invalid_request" => usage_error(e),
                Err(e) => runtime(e),
            }
        }
        KeysCommand::Update {
            id,
            name,
            labels,
            unlabels,
        } => {
            let current = match store.get(&id) {
                Ok(Some(k)) => k.record.labels,
                Ok(None) => return not_found(&id),
                Err(e) => return runtime(e),
            };
            let relabel = !labels.is_empty() || !unlabels.is_empty();
            if name.is_none() && !relabel {
                return usage_error("nothing to change: give --name, --label k=v or --unlabel k");
            }
            let mut new_labels = current;
            for k in &unlabels {
                new_labels.remove(k);
            }
            new_labels.extend(labels);
            if let Err(m) = check_labels(&new_labels) {
                return usage_error(m);
            }
            if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                return usage_error("--name must not be empty");
            }
            let patch = KeyPatch {
                name,
                labels: relabel.then_some(new_labels),
                ..KeyPatch::default()
            };
            change(&*store, &*ledger, &id, &patch)
        }
    }
}
