"""The core every stage uses: the typed config (``config``), reads and writes of local and S3
files (``storage``), a stage's bookkeeping (``manifest``), where every folder and model of a run
lives (``layout``), one run per folder (``locks``), the Ray session and the quiet terminal
(``runtime``), and the user's mistakes (``errors``). Imports only the model layer."""
