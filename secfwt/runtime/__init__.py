"""One party's side of a job: session, inputs, cached forward, job loop, simulate, verify."""
