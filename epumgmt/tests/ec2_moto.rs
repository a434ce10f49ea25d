//! The ec2 example against moto's EC2 server: killrun exits 0 and the IaaS, asked
//! outside the project's code (boto3), lists no instance of the run that is not
//! terminated — also when every process of the run was SIGKILLed first, so that
//! only the run directory and the instances' `epu:run` tag are left to go by.

mod common;

use std::process::Command;

use common::{wait_for, Cli};

fn moto() -> String {
    std::env::var("EPU_MOTO_URL").unwrap_or_else(|_| {
        panic!(
            "this test needs moto's EC2 server: python3 -m pip install 'moto[server]', \
             moto_server -H 127.0.0.1 -p 5000, and EPU_MOTO_URL=http://127.0.0.1:5000 \
             (bash scripts/test.sh does all of it)"
        )
    })
}

/// States of the run's instances, from boto3 (not our code).
fn states_by_tag(run: &str) -> Vec<String> {
    let python = std::env::var("EPU_MOTO_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import boto3, sys
ec2 = boto3.client("ec2", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
for r in ec2.describe_instances(Filters=[{"Name": "tag:epu:run", "Values": [sys.argv[2]]}])["Reservations"]:
    for i in r["Instances"]:
        print(i["State"]["Name"])
"#;
    let out = common::run_with_deadline(
        Command::new(python).args(["-c", script, &moto(), run]),
        common::DEFAULT_LIMIT,
    )
    .unwrap_or_else(|e| panic!("python3 with boto3 (installed with moto): {e}"));
    assert!(
        out.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// An `epumgmt` command with the AWS environment that points at moto.
fn with_aws(cli: &Cli, args: &[&str]) -> Command {
    let mut c = cli.cmd(args);
    c.env("AWS_ENDPOINT_URL_EC2", moto())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    c
}

/// Launches the ec2 example on moto and waits for its 3 instances.
fn launch_three(cli: &Cli) {
    let plan = common::repo().join("examples/ec2/plan.toml");
    let out = cli.run_cmd(
        &mut with_aws(
            cli,
            &["launch", plan.to_str().expect("utf8"), "--run", &cli.run],
        ),
        common::LONG_LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("3 RUNNING instances", 60, cli, || {
        cli.nodes()
            .iter()
            .filter(|n| n["state"] == "RUNNING")
            .count()
            == 3
    });
    let states = states_by_tag(&cli.run);
    assert_eq!(
        states.iter().filter(|s| *s == "running").count(),
        3,
        "{states:?}"
    );
}

fn assert_all_terminated(run: &str) {
    let states = states_by_tag(run);
    assert!(
        !states.is_empty(),
        "moto still lists the terminated instances"
    );
    assert!(
        states.iter().all(|s| s == "terminated"),
        "left at the IaaS: {states:?}"
    );
}

#[test]
fn ec2_sleeper_on_moto_is_killed_to_the_last_instance() {
    let cli = Cli::new("ec2");
    launch_three(&cli);
    // No AWS environment in this shell: the provisioner, disabled, checks the IaaS
    // with its own.
    cli.ok(&["killrun", "--run", &cli.run]);
    assert_all_terminated(&cli.run);
}

#[test]
fn ec2_instances_of_a_run_whose_processes_were_all_sigkilled_are_terminated_by_tag() {
    let cli = Cli::new("ec2-dead");
    launch_three(&cli);
    // Standalone: the supervisor is the host of every service.
    let (sup, _) = common::service_pids(&cli);
    common::signal(sup, "KILL");
    wait_for("the run down", 10, &cli, || {
        cli.json(&["status", "--run", &cli.run])["up"] == false
    });
    let states = states_by_tag(&cli.run);
    assert_eq!(
        states.iter().filter(|s| *s == "running").count(),
        3,
        "the instances outlive their provisioner: {states:?}"
    );

    let out = cli.run_cmd(
        &mut with_aws(&cli, &["killrun", "--run", &cli.run, "--json"]),
        common::LONG_LIMIT,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "killrun: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("killrun --json");
    assert_eq!(v["provisioner_answered"], false, "{v}");
    assert_eq!(v["ec2_terminated_by_tag"], 3, "{v}");
    assert_all_terminated(&cli.run);
    assert!(cli.leftover_processes().is_empty());
}
