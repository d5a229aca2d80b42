"""`python -m safeneurons.demo build|build-judge --out DIR`: rebuild the shipped demo models bit for bit."""
from safeneurons.cli.demo_build import main

main()
