from bnsweep.train import main

main()
