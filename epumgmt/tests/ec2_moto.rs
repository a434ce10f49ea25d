//! The ec2 example against moto's EC2 server: killrun exits 0 and the IaaS, asked
//! outside the project's code (boto3), lists no instance of the run that is not
//! terminated.

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
    let out = Command::new(python)
        .args(["-c", script, &moto(), run])
        .output()
        .expect("python3 with boto3 (installed with moto)");
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

#[test]
fn ec2_sleeper_on_moto_is_killed_to_the_last_instance() {
    let url = moto();
    let cli = Cli::new("ec2");
    let plan = common::repo().join("examples/ec2/plan.toml");
    let out = cli
        .cmd(&["launch", plan.to_str().expect("utf8"), "--run", &cli.run])
        .env("AWS_ENDPOINT_URL_EC2", &url)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("launch");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("3 RUNNING instances", 60, &cli, || {
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

    cli.ok(&["killrun", "--run", &cli.run]);
    let states = states_by_tag(&cli.run);
    assert!(
        !states.is_empty(),
        "moto still lists the terminated instances"
    );
    assert!(
        states.iter().all(|s| s == "terminated"),
        "left at the IaaS: {states:?}"
    );
}
