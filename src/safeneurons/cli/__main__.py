from safeneurons.cli.app import run_as_script

run_as_script()
