"""5. Choosing settings: `orpo sweep` trains one ordinary run per trial of an Optuna study and scores it on
validation data (space.py: what is searched; study.py: where the trials live and who runs them; sweep.py: the
trials, the table, the best config and the one measurement on the test split).

May import: orpo.config, orpo.files, orpo.data, orpo.model, orpo.training, orpo.after.
"""
