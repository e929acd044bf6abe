"""The job pipeline: a suite becomes a plan of jobs (``plan``), each job runs one step (``steps``) and leaves a record
(``jobs``); ``status`` decides which records are still true; ``executor`` and ``slurm`` run what is not."""
