"""`python -m evolve GENOME --storage-path DIR ...` = `mergekit-evolve`: the form a Ray job's
entrypoint uses (scripts/submit_ray_job.sh), where the console script may not be on PATH."""
from evolve.cli import main

if __name__ == "__main__":
    main()
