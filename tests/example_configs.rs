//! Every config in `examples/configs/`, and every full config in the README, passes
//! the built binary's `switchboard check` as it is: exit 0, and no warning but the
//! ones about a provider key variable not set in this environment.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Runs `switchboard check --config path`, and asserts it passes with no warning
/// about the config itself.
fn assert_checks(path: &Path) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: exit {:?}\n{stderr}{stdout}",
        path.display(),
        out.status.code()
    );
    assert!(stdout.contains("config ok"), "{}: {stdout}", path.display());
    for line in stderr.lines() {
        let about_an_unset_key = line.starts_with("warning: providers[")
            && line.contains("].api_key_env: environment variable `")
            && line.contains("` is not set");
        assert!(about_an_unset_key, "{}: {line}", path.display());
    }
}

#[test]
fn every_example_config_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    // The set the issue asks for, at least; any file added later is checked too.
    for want in [
        "openai.toml",
        "anthropic.toml",
        "gemini.toml",
        "azure-openai.toml",
        "local-openai-compatible.toml",
        "openrouter.toml",
        "fallback.toml",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(want)),
            "examples/configs/{want} is missing"
        );
    }
    for f in &files {
        assert_checks(f);
    }
}

/// The ```toml blocks of a Markdown text.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```toml") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.extend(current.take()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn every_full_config_in_the_readme_passes_check() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    // A block with models is a whole config: the providers it names must be in it.
    let configs: Vec<String> = toml_blocks(&readme)
        .into_iter()
        .filter(|b| b.contains("[[models]]"))
        .collect();
    assert!(configs.len() >= 2, "the README's config examples are gone");
    let dir = std::env::temp_dir().join(format!("switchboard-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, block) in configs.iter().enumerate() {
        let path = dir.join(format!("readme-{i}.toml"));
        std::fs::write(&path, block).unwrap();
        assert_checks(&path);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
