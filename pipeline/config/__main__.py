"""``python -m pipeline.config [--config FILE] [--dump] [--write FILE] key.sub=value ...``"""

from pipeline.config.loading import main

main()
