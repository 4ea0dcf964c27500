from benchmarks.efficacy.run import run_efficacy

for p in run_efficacy():
    print(p)
