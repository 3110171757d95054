"""`conjure ui`: a local web app (FastAPI + static pages, no CDN) for data sets, training and the job queue."""
