//! `launch` refuses, before anything runs, a domain its own provisioner would
//! refuse to launch, naming the policy file and the key; nothing is left behind.

mod common;

use common::{repo, Cli};

/// A plan in a temp dir: the sleeper's domain, and `provisioner` as the plan's
/// provisioner section (TOML).
fn plan_with(dir: &std::path::Path, provisioner: &str) -> std::path::PathBuf {
    let domain = std::fs::read_to_string(repo().join("examples/sleeper/domain.toml"))
        .expect("read the sleeper's domain");
    std::fs::write(dir.join("domain.toml"), domain).expect("write domain");
    let plan = dir.join("plan.toml");
    std::fs::write(
        &plan,
        format!("transport = \"standalone\"\ndomains = [\"domain.toml\"]\n\n{provisioner}\n"),
    )
    .expect("write plan");
    plan
}

#[test]
fn a_domain_the_provisioner_would_refuse_is_refused_at_launch() {
    let cli = Cli::new("preflight");
    let dir = tempfile::tempdir().expect("tmp");
    // (case, the plan's provisioner section, the key named)
    let table = [
        (
            "local driver turned off",
            "[provisioner.drivers.local]\nenabled = false\n",
            "deployable.driver",
        ),
        (
            "command not allowed",
            "[provisioner.drivers.local]\nallowed_commands = [\"sleep\"]\n",
            "deployable.command",
        ),
    ];
    for (case, section, key) in table {
        let plan = plan_with(dir.path(), section);
        let out = cli.out(&["launch", plan.to_str().expect("utf8"), "--run", &cli.run]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{case}: launched: {stderr}");
        assert!(
            stderr.contains("domain.toml"),
            "{case}: names the file: {stderr}"
        );
        assert!(stderr.contains(key), "{case}: names {key}: {stderr}");
        assert!(
            !cli.home.path().join("runs").join(&cli.run).exists(),
            "{case}: a run directory was created"
        );
    }
    // The same plan with the driver on launches (the check refuses only what the
    // provisioner would).
    let plan = plan_with(dir.path(), "[provisioner.drivers.local]\nenabled = true\n");
    cli.launch(plan.to_str().expect("utf8"));
    cli.ok(&["killrun", "--run", &cli.run]);
}
