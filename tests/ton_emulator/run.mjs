// Runs Cocoon's signed external messages on real wallet contract code in the TON emulator
// (@ton/sandbox). Reads JSON on stdin: {code, data, balance, now, messages: [{boc, now}],
// processed: [query ids]} (code and data as base64 BOCs); writes JSON on stdout: for each
// message, accepted or the error, and every transfer that left the wallet.
import { Blockchain, createShardAccount } from "@ton/sandbox";
import { Address, Cell, contractAddress } from "@ton/core";

const input = JSON.parse(await new Promise((resolve) => {
    let text = "";
    process.stdin.on("data", (chunk) => (text += chunk));
    process.stdin.on("end", () => resolve(text));
}));

const code = Cell.fromBase64(input.code);
const data = Cell.fromBase64(input.data);
const address = contractAddress(0, { code, data });
const blockchain = await Blockchain.create();
blockchain.now = input.now;
await blockchain.setShardAccount(
    address,
    createShardAccount({ address, code, data, balance: BigInt(input.balance) }),
);

function comment(body) {
    if (!body) return null;
    const s = body.beginParse();
    if (s.remainingBits < 32 || s.loadUint(32) !== 0) return null;
    return s.loadStringTail();
}

const results = [];
for (const message of input.messages) {
    blockchain.now = message.now;
    try {
        const sent = await blockchain.sendMessage(Cell.fromBase64(message.boc));
        const transfers = [];
        const own = sent.transactions.filter((tx) => tx.inMessage?.info.dest?.equals?.(address));
        for (const tx of own) {
            for (const out of tx.outMessages.values()) {
                if (out.info.type !== "internal") continue;
                if (out.info.dest.equals(address)) continue; // the link to its own action list
                transfers.push({
                    destination: out.info.dest.toRawString(),
                    value: out.info.value.coins.toString(),
                    comment: comment(out.body),
                });
            }
        }
        results.push({ accepted: true, transfers, transactions: own.length });
    } catch (error) {
        results.push({ accepted: false, error: String(error.message || error).slice(0, 300) });
    }
}
const processed = [];
for (const queryId of input.processed || []) {
    const got = await blockchain.runGetMethod(address, "processed?", [
        { type: "int", value: BigInt(queryId) },
        { type: "int", value: 0n },
    ]);
    processed.push(got.stackReader.readBigNumber() !== 0n);
}
process.stdout.write(JSON.stringify({ address: address.toRawString(), results, processed }));
