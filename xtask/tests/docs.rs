//! `cargo xtask docs` against the real binaries: every option and command
//! that `sparsebak --help` / `sparsebak-vm --help` shows must be in the man
//! page and (for sparsebak) in every shell's completions, so the generated
//! docs cannot drift from the command line. Needs `cargo build --workspace`
//! first (the binaries sit next to xtask in the target dir).

use std::path::{Path, PathBuf};
use std::process::Command;

fn built(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_xtask")).with_file_name(name);
    assert!(p.is_file(), "{} missing: run `cargo build --workspace` before the tests", p.display());
    p
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `--long` options and the words listed under "Possible values" or
/// "Commands" in a clap --help text.
fn help_words(bin: &Path) -> (Vec<String>, Vec<String>) {
    let help = run_ok(Command::new(bin).arg("--help"));
    let mut options: Vec<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()).to_string())
        .collect();
    options.sort();
    options.dedup();
    let mut commands = Vec::new();
    let mut in_list = false;
    for line in help.lines() {
        let t = line.trim();
        if t.starts_with("Possible values:") || t == "Commands:" {
            in_list = true;
            continue;
        }
        if in_list {
            let word = t.trim_start_matches("- ").split([':', ' ']).next().unwrap_or("");
            if word.is_empty() || !line.starts_with("  ") {
                in_list = false;
            } else if word != "help" {
                commands.push(word.to_string());
            }
        }
    }
    (options, commands)
}

#[test]
fn man_pages_and_completions_cover_the_command_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_ok(Command::new(env!("CARGO_BIN_EXE_xtask")).arg("docs").arg(dir.path()));
    let read = |rel: &str| std::fs::read_to_string(dir.path().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));

    for (bin, page) in [("sparsebak", "man/sparsebak.1"), ("sparsebak-vm", "man/sparsebak-vm.1")] {
        let man = read(page);
        assert!(man.contains(&format!(".TH {bin} 1")), "{page}: title");
        assert!(man.contains(".SH FILES") && man.contains(".SH EXIT STATUS"), "{page}: extra sections");
        let (options, commands) = help_words(&built(bin));
        assert!(options.contains(&"--version".to_string()), "{bin} --help parsed: {options:?}");
        assert!(!commands.is_empty(), "{bin} --help lists commands");
        for o in &options {
            assert!(man.contains(&o.replace('-', "\\-")), "{page} lacks {o}");
        }
        for c in &commands {
            assert!(man.contains(c.as_str()), "{page} lacks command {c}");
        }
        if bin == "sparsebak" {
            assert!(commands.contains(&"receive".to_string()) && commands.contains(&"monitor".to_string()));
            let bash = read("completions/sparsebak.bash");
            let zsh = read("completions/_sparsebak");
            let fish = read("completions/sparsebak.fish");
            assert!(zsh.starts_with("#compdef sparsebak"), "zsh header");
            assert!(fish.contains("complete -c sparsebak"), "fish");
            for text in [&bash, &zsh, &fish] {
                for c in &commands {
                    assert!(text.contains(c.as_str()), "completion lacks command {c}");
                }
            }
            for o in options.iter().filter(|o| *o != "--help" && *o != "--version") {
                assert!(bash.contains(o.as_str()), "bash completion lacks {o}");
                let long = o.trim_start_matches("--");
                assert!(fish.contains(&format!("-l {long}")), "fish completion lacks {o}");
                assert!(zsh.contains(o.as_str()), "zsh completion lacks {o}");
            }
            let st = Command::new("bash").arg("-n").arg(dir.path().join("completions/sparsebak.bash")).status();
            assert!(st.expect("run bash -n").success(), "bash completion parses");
        }
    }
}
